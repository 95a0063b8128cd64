"""The phased LoRA TTT's evaluation time on 8 GPUs, projected from a timed slice on one.

    python -m bench.ttt [--smoke] [--preset frontier] [--name value ...]

The plan (documents, batches, lanes, phases) is the full validation set's: DATA_PATH's validation
shards when they are there (MAX_VAL_TOKENS cuts them to a slice, and the Plan line says so), else a synthetic stream of the record's
size (50,000 documents, 47.85M tokens, log-normal lengths). On one GPU, with the configured model
(random weights: the time does not depend on them), looped:
- compile: compile_ttt_step + warm_up_ttt, as phased_ttt_evaluation does;
- LoRA: SAMPLE_BATCHES batches spread over the processing order (longest to shortest), each
  scored and trained chunk by chunk from fresh adapters; seconds per token-row (rows x window
  width of every forward + backward, model.phased_ttt.lora_work);
- global: GLOBAL_STEPS SGD steps of a global phase over the first documents.
Projection (model.phased_ttt.project_eval_seconds' rule): the busiest of the 8 lanes' token-rows
x the rate, plus the full plan's global steps x the step time / 8 (each rank takes 1/8 of a step's
sequences; the all-reduce is not measured), plus compile. Loading the artifact is not in it:
train.py's eval_time line has it (16-24 s in the record).
"""
import time

import numpy as np
import torch

from bench.common import Bench, table
from model.distributed import synchronize

SAMPLE_BATCHES = 6  # batches timed, spread over the processing order
GLOBAL_STEPS = 3  # global SGD steps timed
RECORD_DOCS, RECORD_TOKENS = 50_000, 47_851_521  # FRONTIER.md section 1: the validation set


def synthetic_stream(docs: int, tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """BOS + random ids per document, log-normal lengths (sigma 1) scaled to `tokens` in all."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(0.0, 1.0, docs)
    lengths = np.maximum(2, np.round(lengths / lengths.sum() * tokens)).astype(np.int64)
    stream = torch.from_numpy(rng.integers(2, vocab, int(lengths.sum()))).long()
    stream[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 1
    return stream


def validation_stream(cfg, smoke: bool) -> tuple[torch.Tensor, str]:
    if smoke:
        return synthetic_stream(24, 24 * 12, cfg.vocab_size), "synthetic (smoke): 24 documents"
    try:
        from model.data import load_validation_tokens

        tokens = load_validation_tokens(cfg.data_path, 1, cfg.max_val_tokens, cfg.vocab_size)
        cut = f", cut by MAX_VAL_TOKENS={cfg.max_val_tokens}: not the full set" if cfg.max_val_tokens > 0 else ""
        return tokens, f"validation shards of {cfg.data_path}{cut}"
    except (ValueError, FileNotFoundError) as e:
        return (synthetic_stream(RECORD_DOCS, RECORD_TOKENS, cfg.vocab_size),
                f"synthetic, the record's size ({str(e).splitlines()[0][:80]}...)")


def main(argv=None) -> None:
    bench = Bench("bench.ttt", argv)
    cfg, device = bench.cfg, torch.device(bench.device)
    from model.bpb import SidecarBytes
    from model.phased_ttt import (EVAL_LIMIT_S, BatchedLora, Phase, _global_phase, _run_batch, compile_ttt_step,
                                  global_steps, lane_work, lora_token_losses, lora_work, make_plan, warm_up_ttt)

    if bench.smoke:  # tiny: chunks of 4 in windows of 16, batches of 3, phases early, global rows of 16
        cfg.ttt_chunk_size, cfg.ttt_eval_seq_len, cfg.ttt_batch_size, cfg.ttt_lora_rank = 4, 16, 3, 4
        cfg.phased_ttt_prefix_docs, cfg.global_ttt_chunk_tokens = 12, 64
    tokens, source = validation_stream(cfg, bench.smoke)
    plan = make_plan(tokens, cfg)
    model = bench.model.to(device)
    model.looping = True
    tokens = tokens.to(device)
    luts = SidecarBytes(torch.ones(tokens.numel(), dtype=torch.int32, device=device))

    started = time.perf_counter()
    step_fn = lora_token_losses
    if bench.cuda:
        step_fn = compile_ttt_step()
        warm_up_ttt(model, step_fn, cfg)
    synchronize(device)
    compile_s = time.perf_counter() - started

    positions = np.unique(np.linspace(0, len(plan.order) - 1, SAMPLE_BATCHES).round().astype(int))
    rows, seconds, work = [], 0.0, 0
    for p in model.parameters():
        p.requires_grad_(False)
    for position in positions:
        doc_ids = plan.batches[plan.order[position]]
        lora = BatchedLora(cfg, len(model.plan()), len(doc_ids), device=device)
        lora.reset_a(torch.Generator(device=device).manual_seed(int(position)))
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        synchronize(device)
        t0 = time.perf_counter()
        _run_batch(model, step_fn, tokens, doc_ids, plan, lora, cfg, luts, sums, None)
        synchronize(device)
        batch_s, batch_work = time.perf_counter() - t0, lora_work(plan, [position], cfg)
        seconds, work = seconds + batch_s, work + batch_work
        longest = int(plan.docs.length[doc_ids].max())
        rows.append({"part": f"LoRA batch {position} ({len(doc_ids)} docs, longest {longest})", "seconds": batch_s,
                     "token-rows": batch_work, "us per token-row": 1e6 * batch_s / batch_work})
    rate = seconds / work

    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    docs, total = [], 0
    for i in np.concatenate([plan.batches[k] for k in plan.order]):  # documents until GLOBAL_STEPS + 1 chunks
        docs.append(int(i))
        total += int(plan.docs.length[i])
        if total > (GLOBAL_STEPS + 1) * cfg.global_ttt_chunk_tokens:
            break
    synchronize(device)
    t0 = time.perf_counter()
    steps = _global_phase(model, tokens, plan, Phase(after=0, docs=np.array(docs)), cfg, 0, 1, None)
    synchronize(device)
    step_s = (time.perf_counter() - t0) / max(1, steps)
    chunk = cfg.global_ttt_chunk_tokens
    rows.append({"part": f"global SGD ({steps} steps of {chunk} tokens)", "seconds": step_s * steps,
                 "token-rows": steps * chunk, "us per token-row": 1e6 * step_s / chunk})

    lanes = lane_work(plan, cfg)
    lora_8 = float(lanes.max()) * rate
    global_8 = global_steps(plan, cfg) * step_s / 8
    total_8 = compile_s + lora_8 + global_8
    print(bench.header("phased LoRA TTT: the plan's evaluation projected on 8 GPUs"))
    print(f"Plan: {source}; {len(plan.docs.start):,} documents, {len(plan.batches)} batches of {cfg.ttt_batch_size}, "
          f"phases after positions {[p.after for p in plan.phases]}, {global_steps(plan, cfg)} global steps; "
          f"lane token-rows min/max {lanes.min():,}/{lanes.max():,}.\n")
    print(table(rows))
    print()
    print(table([
        {"part": "compile + warm-up (measured)", "8-GPU seconds": compile_s},
        {"part": "LoRA (busiest lane x rate)", "8-GPU seconds": lora_8},
        {"part": "global phases (steps x step / 8)", "8-GPU seconds": global_8},
        {"part": "total without loading", "8-GPU seconds": total_8},
    ]))
    if total_8 > EVAL_LIMIT_S:
        print(f"\nWARNING: the projected evaluation ({total_8:.0f} s before loading) exceeds the {EVAL_LIMIT_S:.0f} s limit")


if __name__ == "__main__":
    main()
