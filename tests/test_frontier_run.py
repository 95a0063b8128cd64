"""The frontier preset end to end on the CPU (issue 14's smoke run): document-aligned batches,
the loop switch, the EMA, GPTQ calibrated inside the budget, the per-group artifact with its
packed code, the phased LoRA TTT score on the evaluation clock, and the record. Plus the compile
guard: the warm-up compiles every graph, so none is compiled inside the timed run."""
import functools
import json
import os
import re

import numpy as np
import pytest
import torch

import kernels
from model.data import read_shard, write_shard

from tests.test_train import finals, train

# frontier-smoke with a smaller trunk (model_dim 160 still sends the MLP and embedding through GPTQ),
# the loop on half-way, an EMA that moves in 12 steps, and the phased TTT at a size the sample holds
FRONTIER_TINY = [
    "--preset", "frontier-smoke", "--model_dim", "160", "--num_heads", "4", "--num_kv_heads", "2", "--rope_dims", "8",
    "--iterations", "12", "--enable_looping_at", "0.5", "--ema_decay", "0.9", "--val_loss_every", "6",
    "--val_batch_size", "2048",
    "--ttt_eval_seq_len", "128", "--ttt_batch_size", "2", "--ttt_lora_rank", "8",
    "--phased_ttt_prefix_docs", "2", "--phased_ttt_num_phases", "1", "--global_ttt_chunk_tokens", "512",
    "--global_ttt_batch_seqs", "2",
]


def documents_sample(shared_data: str, folder) -> str:
    """The sample's train shards, and as validation 12,289 tokens from its second document on (the
    first is 21,022 tokens long: the phased TTT needs several documents to plan its phases)."""
    sample = os.path.join(shared_data, "fineweb10B_sp1024_sample")
    folder.mkdir()
    for name in sorted(os.listdir(sample)):
        if name.startswith("fineweb_train_"):
            os.symlink(os.path.join(sample, name), folder / name)
    val = read_shard(os.path.join(sample, "fineweb_val_000000.bin"))
    second = int(np.flatnonzero(val == 1)[1])
    write_shard(str(folder / "fineweb_val_000000.bin"), val[second : second + 12289])
    return str(folder)


@pytest.mark.slow
def test_frontier_smoke_pipeline_end_to_end(tmp_path, shared_data):
    data = ["--data_path", documents_sample(shared_data, tmp_path / "data")]
    result = train(tmp_path, *FRONTIER_TINY, *data, "--run_id", "frontier", env={"OMP_NUM_THREADS": "1"})
    run = tmp_path / "runs" / "frontier"
    log = (run / "train.log").read_text()
    for line in ("gptq: a calibration rehearsal took", "warmup:", "depth recurrence on: 8 block applications",
                 "ema: the weights' moving average", "gptq: calibration on 2 training batches",
                 "export pergroup:", "phased_ttt val_loss:", "eval_time load:", "eval_time_projected",
                 "step:12 val_loss:", "final_prequant_ema val_loss:", "final_roundtrip val_loss:", "record:"):
        assert line in log, f"{line!r} missing from the frontier smoke log:\n{log}"
    assert "final_sliding" not in log  # a document-isolated model has no sliding-window score
    global_steps = int(re.search(r"phased_ttt .* global_steps:(\d+)", log).group(1))
    assert global_steps > 0, "the phased TTT ran no global SGD phase"
    final = finals(run)
    assert 0.5 < final["val_bpb"] < 10 and 0.5 < final["ttt_val_bpb"] < 10
    # the phased TTT adapts on documents it has scored: it beats the same artifact scored without it
    assert final["ttt_val_bpb"] < final["val_bpb"], (final["ttt_val_bpb"], final["val_bpb"])
    assert {"eval_seconds", "eval_projected_8gpu_seconds"} <= final.keys()  # the clock's total is recorded (timings: bench.ttt)
    # the counted code is the packed file the record holds
    assert os.path.getsize(run / "record" / "train_gpt.py") == final["code_bytes"]
    assert final["total_bytes"] == final["artifact_bytes"] + final["code_bytes"]
    assert json.loads((run / "record" / "submission.json").read_text())["val_bpb"] == final["ttt_val_bpb"]
    assert result.stderr.count("\n") < 50  # no tracebacks
    # the artifact scores again on its own, to the same diagnostic numbers
    train(tmp_path, *FRONTIER_TINY, *data, "--eval-only", str(run / "final_model.int6.ptz"), "--ttt_enabled", "0",
          env={"OMP_NUM_THREADS": "1"})
    assert finals(run)["val_bpb"] == final["val_bpb"]


def _counting_compile(counter: list, original=torch.compile):
    """torch.compile with a backend that counts the graphs it is handed and runs them eagerly."""
    def backend(gm, example_inputs):
        counter.append(gm)
        return gm.forward
    return functools.partial(original, backend=backend)


@pytest.mark.slow
def test_no_compilation_inside_the_timed_run(monkeypatch, shared_data):
    """After warm_up, training steps across the loop switch (the loader's own cu_seqlens lengths)
    compile nothing new: both loop states and every primed cu_seqlens length were compiled."""
    from model.config import load_config
    from model.distributed import Dist
    from model.document_loader import DocumentLoader
    from model.training import build_training_state, training_step, warm_up

    graphs = []
    monkeypatch.setattr(torch, "compile", _counting_compile(graphs))
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "_backend", "reference")  # the graphs are the point, not the kernels (slow in the interpreter)
    cfg, _ = load_config(["--preset", "frontier-smoke", "--model_dim", "64", "--num_heads", "4", "--num_kv_heads", "2",
                          "--rope_dims", "8", "--compile", "1", "--warmup_steps", "2"], environ={})
    ctx = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader = DocumentLoader(cfg.data_path, vocab_size=cfg.vocab_size)
    state = build_training_state(cfg, ctx, loader)
    warm_up(state)
    compiled = len(graphs)
    assert compiled >= 2  # a graph per loop state (and the cu_seqlens length made dynamic)
    for step in range(4):
        state.model.looping = step >= 2  # the switch, as the trainer makes it
        training_step(state, 1.0, 0.95)
    assert len(graphs) == compiled, f"{len(graphs) - compiled} graph(s) compiled inside the timed run"
    torch._dynamo.reset()
