"""bench/export.py on a checkpoint's weights: the checkpoint's config and weights are the ones
compressed, and every compressor's row is printed."""
import dataclasses

import torch

from bench import export as bench_export
from bench.common import SMOKE_ARGS, bench_config, build_model
from model.checkpoint import save_checkpoint


def test_checkpoint_weights_are_the_ones_compressed(tmp_path, capsys):
    cfg, _ = bench_config("bench.test", [*SMOKE_ARGS, "--vocab_size", "1400", "--model_dim", "24", "--num_heads", "2"])
    model = build_model(cfg)
    with torch.no_grad():
        model.tok_emb.weight.mul_(3)  # not the initialisation bench.export would build
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"config": dataclasses.asdict(cfg), "model": model.state_dict()}, str(path))
    argv, state = bench_export.checkpoint_weights(["--checkpoint", str(path), "--zstd_level", "3"])
    assert argv[-2:] == ["--zstd_level", "3"] and "--model_dim" in argv and torch.equal(
        state["model"]["tok_emb.weight"], model.tok_emb.weight)
    assert bench_export.main(["--checkpoint", str(path), "--zstd_level", "3"]) == 0
    out = capsys.readouterr().out
    assert "d=24" in out and "trained (checkpoint)" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "compressor" not in line]
    assert [row.split("|")[1].strip() for row in rows][:4] == ["zstd", "brotli", "pergroup+brotli", "pergroup+zstd"]
