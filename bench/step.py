"""The whole training step on one GPU, reference vs triton kernels, and the evaluation throughput.

    python -m bench.step [--steps N] [--skip-eval] [--smoke] [--name value ...]
    torchrun --standalone --nproc_per_node=G -m bench.step --distributed [--steps N] [--smoke] [--name value ...]

(`--name value`: any model/config.py setting, e.g. `--num_layers 11`; defaults are SPEC's model.)
`--smoke`: the whole script at a tiny model (SMOKE_ARGS, uncompiled; settings given after it win),
one wall-clock call per timing, on the GPU or else on the CPU through Triton's interpreter
(TRITON_INTERPRET=1): it checks the script end to end, its figures mean nothing.

One step = SPEC's 786,432 tokens as grad_accum_total = 8 micro-batches of 48 x 2048 on one GPU,
through train.py's own code: model.training.training_step on the state build_training_state makes
(forward + backward under bf16 autocast through torch.compile(model, fullgraph=True), the grad-norm
clip when GRAD_CLIP_NORM > 0, then Muon + both AdamW), on random tokens generated on the device
beforehand (FixedBatches). Per backend (KERNELS=reference, then KERNELS=triton; torch._dynamo.reset()
and a freshly built, freshly compiled model for each): 2 untimed steps compile and prime everything,
one step measures peak memory, then bench.common.median_ms (triton.testing.do_bench, median) times
whole steps with its millisecond budgets sized to about 2 warm-up and `--steps` (default 10) timed
steps (do_bench first runs 5 calls of its own to estimate; about 1 s per step at SPEC's size). If a backend runs out of memory at 48 x 2048, it is retried with twice the micro-batches of
half the size (same tokens per step); the table says which micro-batch was measured.

MFU: FLOPs per token = 6N + 6*L*d*T, N = matrix parameters including the tied head (every linear
weight: the blocks' matrices and the bigram and VE projections, plus tok_emb counted once as the
head's matmul), L layers, d model dim, T sequence length; MFU = FLOPs/token x tokens/s / 989e12
(H100 SXM bf16 dense datasheet peak, whatever the device).

Step-time shares: torch.profiler over 2 steps. GPU kernels launched inside the optimizer phase
(a record_function range) count as "optimizer"; every other kernel is classified by its name
(KERNEL_CLASSES below, first match wins). Shares are of summed GPU kernel time; "GPU busy" is that
sum over the profiled steps' wall time.

--distributed (under torchrun, on however many GPUs it is given; on the CPU with --smoke, gloo and
the toy model, a smoke test of the glue): the step as a real run takes it, communication, optimizer
and loader included: model.training.training_step on the state build_training_state makes for W
ranks (Muon sharded over the ranks, gradients reduce-scattered and all-gathered, model/grad_sync.py),
fed by train.py's loader (PrefetchLoader over DistributedTokenLoader) reading random-token shards
written for the run. 2 untimed steps, then `--steps` steps timed together by wall clock between two
synchronisations (no per-step sync, as in training); ms/step is the slowest rank's. MFU = FLOPs/token
(the formula above) x tokens/s / (W x 989e12). Communication from torch.profiler over 2 more steps on
rank 0: the kernels (on the CPU: the innermost ops) whose names say nccl/gloo/c10d are communication,
the rest compute; "comm ms/step" is the union of the communication intervals, "exposed comm
ms/step" the part of it that no compute interval overlaps (the time communication adds to the step).
"MB sent/step": each rank's buffers of the reduce-scatter, the all-gather and the small all-reduce
(GradientSync.bytes_per_step: exact, padding included), to read the communication times against.

Evaluation (--skip-eval leaves it out): the triton backend, the eval model compiled as train.py
compiles it. Sliding-window scoring (evaluate_sliding, window eval_seq_len, stride eval_stride,
eval_batch_seqs windows per batch) on random tokens, and legal score-first TTT (evaluate_ttt):
seconds per chunk = (time of 3 chunks - time of 1 chunk) / 2, since the last chunk is only
scored, never trained on. Both timed by wall clock (synchronised) after an untimed warm-up run,
and projected to the 62,021,632-token validation set on 8 GPUs as tokens / (tokens/s per GPU x 8)
(perfect 8-way scaling assumed).
"""
import dataclasses
import gc
import os
import shutil
import sys
import tempfile
import time

import torch

import kernels
from bench.common import bench_device, header, median_ms, micro_batch, table, wall_ms
from model import evaluate
from model.config import Config, help_text, load_config
from model.data import DistributedTokenLoader, write_shard
from model.distributed import Dist, barrier, from_rank_zero, leave_process_group, setup_distributed, synchronize
from model.gpt import GPT
from model.precision import autocast
from model.prefetch import PrefetchLoader
from model.training import OPTIMIZER_RANGE, build_training_state, training_step

H100_BF16_PEAK_FLOPS = 989e12  # H100 SXM datasheet, dense bf16
VAL_TOKENS = 62_021_632
EVAL_GPUS = 8
COMPILE_STEPS = 2  # untimed steps that compile and prime kernels, optimizer state and allocator
# Kernel-name patterns (lower case) -> the part of the step they belong to; first match wins (the loss
# head first: its log_softmax would otherwise match attention's softmax).
# Ours: _xsa_* (attention), _softcap_ce_* (loss head), _relu2_gemm (MLP relu^2), Newton-Schulz's _sym_gram/_ns_update/
# _sumsq_partials/_normalise (normally inside the optimizer range anyway). Inductor names its
# fused kernels after the ops they fuse (triton_red_fused__log_softmax_...); cuBLAS/CUTLASS GEMMs
# carry gemm/cutlass/xmma/nvjet. The reference attention is explicit matmuls + softmax, so its
# QK^T and PV products land in the matmul row and its softmax in "attention".
KERNEL_CLASSES = (
    ("loss head", ("softcap", "cross_entropy", "nll", "log_softmax", "logsumexp", "tanh")),
    ("attention", ("xsa", "flash", "attn", "sdpa", "fmha", "_softmax_", "fused__softmax", "masked_fill")),
    ("optimizer", ("sym_gram", "ns_update", "sumsq_partials", "_normalise_kernel", "adam", "multi_tensor", "foreach")),
    # Inductor's relu^2 passes (fused_pow_relu, ..._threshold_backward); under triton, _relu2_gemm_kernel
    # also carries three of the MLP's GEMMs, so this row is activation + those GEMMs there.
    ("MLP relu^2", ("relu",)),
    ("matmul (projections, MLP)", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::bmm", "aten::addmm")),
)


# --smoke's model and batch: 2 layers (one encoder, one decoder with XSA and VE), T = 32, 2 micro-batches.
SMOKE_ARGS = ["--preset", "smoke", "--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--num_kv_heads", "1",
              "--rope_dims", "8", "--xsa_last_n", "1", "--ve_layers", "1", "--bigram_vocab_size", "31", "--bigram_dim", "8",
              "--ve_dim", "8", "--train_seq_len", "32", "--train_batch_tokens", "128", "--grad_accum_total", "2",
              "--eval_seq_len", "32", "--eval_stride", "8", "--eval_batch_seqs", "4", "--ttt_chunk_tokens", "64",
              "--ttt_batch_seqs", "2"]


def classify_kernel(name: str) -> str:
    low = name.lower()
    for part, patterns in KERNEL_CLASSES:
        if any(p in low for p in patterns):
            return part
    return "other"


# ----------------------------------------------------------------------------- arithmetic
def matrix_params(model: GPT) -> int:
    """N of the MFU formula: every linear weight (the blocks, bigram and VE projections) + tok_emb as the tied head."""
    return sum(p.numel() for p in model.param_groups()["matrix"]) + model.tok_emb.weight.numel()


def flops_per_token(cfg: Config, n_matrix: int) -> int:
    """6N (forward + backward of the matmuls) + 6*L*d*T (causal attention's QK^T and PV, forward + backward)."""
    return 6 * n_matrix + 6 * cfg.num_layers * cfg.model_dim * cfg.train_seq_len


def projected_eval_seconds(tokens_per_second_per_gpu: float, tokens: int = VAL_TOKENS, gpus: int = EVAL_GPUS) -> float:
    return tokens / (tokens_per_second_per_gpu * gpus)


def parse_args(argv: list[str]) -> tuple[Config, int, bool, bool]:
    """(config, timed steps, skip eval, smoke) from `--steps N`, `--skip-eval`, `--smoke` and config settings."""
    argv, steps, skip_eval, smoke = list(argv), 10, False, False
    if "--skip-eval" in argv:
        argv.remove("--skip-eval")
        skip_eval = True
    if "--smoke" in argv:
        argv.remove("--smoke")
        smoke, steps = True, 1
        argv = SMOKE_ARGS + argv
    if "--steps" in argv:
        i = argv.index("--steps")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            raise ValueError("--steps needs a positive whole number of timed steps, e.g. --steps 10")
        steps = int(argv.pop(i + 1))
        argv.pop(i)
    cfg, flags = load_config(argv, prog="python -m bench.step")
    if "--help" in flags:
        print(__doc__.split("\n\n")[1] + "\n")  # the usage line
        print(help_text("python -m bench.step"))
        raise SystemExit(0)
    return cfg, steps, skip_eval, smoke


# ----------------------------------------------------------------------------- timers
def do_bench_steps(fn, repeats: int, warmup: int = 2) -> float:
    """Median ms of fn by bench.common.median_ms; do_bench takes budgets in ms, so they are
    sized from one synchronised call to give about `warmup` and `repeats` calls."""
    estimate = wall_ms(fn, torch.device("cuda"))
    return median_ms(fn, warmup=warmup * estimate, rep=(repeats + 0.5) * estimate)


def wall_clock_median(device: torch.device):
    """A timer(fn, repeats) -> median wall-clock ms of `repeats` synchronised calls."""
    def timer(fn, repeats: int) -> float:
        times = sorted(wall_ms(fn, device) for _ in range(repeats))
        return times[len(times) // 2]
    return timer


# ----------------------------------------------------------------------------- training step
class FixedBatches:
    """A loader (train.py's interface) that hands out the same random micro-batches, made on the
    device beforehand, in turn: the benchmark times the step, not the data."""

    def __init__(self, cfg: Config, device: torch.device):
        micro_seqs, _ = micro_batch(cfg)
        self.batches = [torch.randint(0, cfg.vocab_size, (micro_seqs, cfg.train_seq_len + 1), device=device)
                        for _ in range(cfg.grad_accum_total)]  # [micro_seqs, T + 1] each
        self.next = 0

    def next_batch(self, batch_tokens_per_rank: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.batches[self.next]
        self.next = (self.next + 1) % len(self.batches)
        return seq[:, :-1], seq[:, 1:]


def make_step(cfg: Config, device: torch.device):
    """(step, model): step() is train.py's training_step on the state train.py builds (one rank,
    all grad_accum_total micro-batches), at LR scale 1 and the final Muon momentum."""
    state = build_training_state(cfg, Dist.single(device), FixedBatches(cfg, device))
    return (lambda: training_step(state, 1.0, cfg.muon_momentum)), state.model


def step_shares(step, device: torch.device, steps: int = 2) -> tuple[list[dict], float]:
    """([{part, share %}], busy fraction) of kernel time over `steps` profiled steps. On the CPU
    (code-path check only) the 'kernels' are the CPU ops' self times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        wall = wall_ms(lambda: [step() for _ in range(steps)], device)
    events = prof.events()
    # The optimizer range's span on the device timeline (CUDA) or host timeline (CPU).
    optimizer_spans = [(e.time_range.start, e.time_range.end) for e in events
                       if e.name == OPTIMIZER_RANGE and e.device_type == kind]
    totals = {}
    for e in events:
        if e.device_type != kind or e.name == OPTIMIZER_RANGE or getattr(e, "is_user_annotation", False):
            continue
        us = e.time_range.end - e.time_range.start if cuda else e.self_cpu_time_total
        in_optimizer = any(a <= e.time_range.start < b for a, b in optimizer_spans)
        part = "optimizer" if in_optimizer else classify_kernel(e.name)
        totals[part] = totals.get(part, 0.0) + us
    kernel_us = sum(totals.values())
    shares = [{"part": k, "share %": 100 * v / (kernel_us or 1.0)} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    return shares, kernel_us / 1e3 / wall


def measure_training_step(cfg: Config, backend: str, device: torch.device, steps: int, timer,
                          warm_steps: int = COMPILE_STEPS, profile_steps: int = 2) -> dict:
    """One backend's ms/step, tokens/s, MFU, peak memory and (profile_steps > 0) step-time shares.

    timer(fn, repeats) -> median ms of one call of fn.
    """
    with kernels.use_backend(backend):
        torch._dynamo.reset()  # the compiled graph bakes in the backend's ops: recompile per backend
        step, model = make_step(cfg, device)
        for _ in range(warm_steps):
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        ms = timer(step, steps)
        shares, busy = step_shares(step, device, profile_steps) if profile_steps else ([], float("nan"))
    tokens_per_s = cfg.train_batch_tokens / (ms / 1e3)
    achieved = flops_per_token(cfg, matrix_params(model)) * tokens_per_s
    micro_seqs, _ = micro_batch(cfg)
    return {
        "backend": backend,
        "micro-batches": f"{cfg.grad_accum_total} x {micro_seqs} x {cfg.train_seq_len}",
        "ms/step": ms,
        "tokens/s": tokens_per_s,
        "TFLOP/s": achieved / 1e12,
        "MFU %": 100 * achieved / H100_BF16_PEAK_FLOPS,
        "peak GiB": peak_gib,
        "GPU busy %": 100 * busy,
        "shares": shares,
    }


def measure_training_step_fitting(cfg: Config, backend: str, device: torch.device, steps: int, timer, most_micro: int = 64,
                                  **measure) -> dict:
    """measure_training_step, retried with twice the micro-batches (same tokens) after an out-of-memory."""
    while True:
        try:
            return measure_training_step(cfg, backend, device, steps, timer, **measure)
        except torch.cuda.OutOfMemoryError:
            pass
        gc.collect()
        torch.cuda.empty_cache()
        accum = 2 * cfg.grad_accum_total
        if accum > most_micro or (cfg.train_batch_tokens // accum) % cfg.train_seq_len:
            return {"backend": backend, "micro-batches": f"out of memory down to {cfg.grad_accum_total} micro-batches", "shares": []}
        print(f"{backend}: out of memory with {cfg.grad_accum_total} micro-batches; retrying with {accum}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, grad_accum_total=accum).validate()


# ----------------------------------------------------------------------------- evaluation
def measure_eval(cfg: Config, backend: str, device: torch.device, windows: int, timer, warm_up: bool = True) -> dict:
    """Sliding-window tokens/s (windows + 1 windows, each counted for the `stride` targets it scores
    in steady state) and legal-TTT seconds per (score + adapt) chunk, each projected to the
    validation set on 8 GPUs. warm_up=False skips the untimed compiling calls (a smoke run)."""
    with kernels.use_backend(backend):
        torch._dynamo.reset()
        torch.manual_seed(cfg.seed)
        model = GPT(cfg).to(device)
        if cfg.compile:  # as train.py compiles its evaluation model
            evaluate.compile_for_eval(model)
        # Byte counts do not change the timing: every token counts 1 byte, none is a boundary.
        luts = (torch.ones(cfg.vocab_size, dtype=torch.int16, device=device),
                torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device),
                torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device))
        sliding_targets = cfg.eval_seq_len + windows * cfg.eval_stride
        sliding_tokens = torch.randint(0, cfg.vocab_size, (sliding_targets + 1,), device=device)

        def sliding():
            evaluate.evaluate_sliding(model, sliding_tokens, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, luts)

        ttt_tokens = torch.randint(0, cfg.vocab_size, (3 * cfg.ttt_chunk_tokens + 1,), device=device)

        def ttt(chunks: int):
            return lambda: evaluate.evaluate_ttt(model, ttt_tokens[:chunks * cfg.ttt_chunk_tokens + 1], cfg, luts)

        with autocast(device):
            if warm_up:
                sliding()  # compiles every window batch shape
            sliding_ms = timer(sliding, 1)
            if warm_up:
                ttt(2)()  # compiles the TTT training shape
            one_chunk_ms, three_chunks_ms = timer(ttt(1), 1), timer(ttt(3), 1)
    # Every window costs one full forward; in steady state it scores `stride` targets (only the
    # first scores a whole window's worth, an edge effect the 62M-token set does not have).
    sliding_tps = (windows + 1) * cfg.eval_stride / (sliding_ms / 1e3)
    ttt_chunk_s = max(three_chunks_ms - one_chunk_ms, 0.0) / 2 / 1e3
    ttt_tps = cfg.ttt_chunk_tokens / ttt_chunk_s if ttt_chunk_s > 0 else float("inf")
    return {
        "sliding tokens/s/GPU": sliding_tps,
        "sliding: val set on 8 GPUs (s)": projected_eval_seconds(sliding_tps),
        "TTT s/chunk/GPU": ttt_chunk_s,
        "TTT: val set on 8 GPUs (s)": projected_eval_seconds(ttt_tps),
    }


# ----------------------------------------------------------------------------- the distributed step (torchrun)
COMMUNICATION = ("nccl", "gloo", "c10d")  # kernel / op names of collectives
PROFILED_STEPS = 2


def is_communication(name: str) -> bool:
    return any(part in name.lower() for part in COMMUNICATION)


def merged(intervals) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as sorted, disjoint intervals."""
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def communication_time(intervals) -> tuple[float, float]:
    """(communication, exposed communication) over (start, end, is_communication) intervals: the
    union of the communication intervals, and the part of it no compute interval overlaps."""
    comm = merged((a, b) for a, b, c in intervals if c)
    compute = merged((a, b) for a, b, c in intervals if not c)
    total = sum(b - a for a, b in comm)
    overlap, j = 0.0, 0
    for a, b in comm:
        while j < len(compute) and compute[j][1] <= a:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < b:
            overlap += min(b, compute[k][1]) - max(a, compute[k][0])
            k += 1
    return total, total - overlap


def profiled_intervals(step, device: torch.device, steps: int = PROFILED_STEPS) -> list[tuple[float, float, bool]]:
    """(start, end, is_communication) in microseconds of the GPU kernels (on the CPU: the innermost
    ops, which do not nest) of `steps` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    return [(e.time_range.start, e.time_range.end, is_communication(e.name)) for e in prof.events()
            if e.device_type == kind and not getattr(e, "is_user_annotation", False) and (cuda or not e.cpu_children)]


def random_shards(cfg: Config, ctx: Dist) -> str:
    """A folder of two random-token train shards (rank 0 writes them) holding a few steps' worth, so
    the loader crosses shard ends and wraps around as in a run."""
    folder = from_rank_zero(tempfile.mkdtemp(prefix="bench_step_") if ctx.is_main else None)
    if ctx.is_main:
        generator = torch.Generator().manual_seed(cfg.seed)
        per_shard = 2 * cfg.train_batch_tokens + 1
        for i in range(2):
            tokens = torch.randint(0, cfg.vocab_size, (per_shard,), generator=generator, dtype=torch.int32).numpy()
            write_shard(os.path.join(folder, f"fineweb_train_{i:06d}.bin"), tokens)
    barrier()
    return folder


def measure_distributed_step(cfg: Config, ctx: Dist, steps: int, warm_steps: int = COMPILE_STEPS) -> dict:
    """ms/step (slowest rank), tokens/s, MFU and communication of the real step on ctx's ranks."""
    folder = random_shards(cfg, ctx)
    try:
        loader = PrefetchLoader(DistributedTokenLoader(folder, ctx.rank, ctx.world_size, vocab_size=cfg.vocab_size))
        state = build_training_state(cfg, ctx, loader)
        step = lambda: training_step(state, 1.0, cfg.muon_momentum)  # noqa: E731
        for _ in range(warm_steps):
            step()
        synchronize(ctx.device)
        barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(ctx.device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=ctx.device)
        if ctx.enabled:
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        comm_us, exposed_us = communication_time(profiled_intervals(step, ctx.device))
        loader.close()
    finally:
        barrier()
        if ctx.is_main:
            shutil.rmtree(folder, ignore_errors=True)
    ms = 1e3 * float(elapsed) / steps
    tokens_per_s = cfg.train_batch_tokens / (ms / 1e3)
    achieved = flops_per_token(cfg, matrix_params(state.model)) * tokens_per_s
    micro_seqs = cfg.train_batch_tokens // cfg.grad_accum_total // cfg.train_seq_len
    sent = {}  # one rank: nothing is communicated
    if state.grad_sync is not None:
        sent = state.grad_sync.bytes_per_step(state.optimizers[0].param_groups[0]["compute_dtype"])
    return {
        "GPUs": ctx.world_size if ctx.device.type == "cuda" else f"{ctx.world_size} CPU ranks",
        "micro-batches per rank": f"{cfg.grad_accum_steps(ctx.world_size)} x {micro_seqs} x {cfg.train_seq_len}",
        "ms/step": ms,
        "tokens/s": tokens_per_s,
        "MFU %": 100 * achieved / (H100_BF16_PEAK_FLOPS * ctx.world_size),
        "comm ms/step": comm_us / 1e3 / PROFILED_STEPS,
        "exposed comm ms/step": exposed_us / 1e3 / PROFILED_STEPS,
        "MB sent/step (RS + AG + AR)": " + ".join(f"{sent[k] / 1e6:.3g}" for k in sent) if sent else "0",
    }


def main_distributed(argv: list[str]) -> None:
    cfg, steps, _, smoke = parse_args(argv)
    ctx = setup_distributed()
    try:
        if ctx.device.type != "cuda" and not smoke:
            raise SystemExit("bench.step --distributed: no GPU here; time it on GPUs, or check the glue on the CPU with --smoke")
        row = measure_distributed_step(cfg, ctx, steps, warm_steps=0 if smoke else COMPILE_STEPS)
        if ctx.is_main:
            name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu (gloo)"
            print(header(f"The distributed training step: {cfg.train_batch_tokens:,} tokens, {cfg.num_layers}L "
                         f"d={cfg.model_dim}, {ctx.world_size} x {name}"))
            if smoke:
                print("SMOKE RUN (--smoke): a tiny uncompiled model on CPU ranks; the figures mean nothing.\n")
            print(f"FLOPs/token = 6N + 6*L*d*T (N = matrix params incl. tied head); MFU = FLOPs/token x tokens/s / "
                  f"({ctx.world_size} x {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s, the H100 SXM bf16 dense datasheet peak). "
                  f"ms/step: {steps} steps by wall clock, the slowest rank, after {0 if smoke else COMPILE_STEPS} untimed. "
                  f"Communication: {PROFILED_STEPS} profiled steps on rank 0; exposed = not overlapped by compute.\n")
            print(table([row]))
    finally:
        leave_process_group()


# ----------------------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    if "--distributed" in argv:
        return main_distributed([a for a in argv if a != "--distributed"])
    cfg, steps, skip_eval, smoke = parse_args(argv)
    device = torch.device(bench_device("bench.step", smoke))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    # A smoke run checks the glue, not the figures: no warm-up (the smoke model is not compiled),
    # one wall-clock call, one profiled step and a few eval windows.
    if smoke:
        step_timer, timing, measure, windows = wall_clock_median(device), "one wall-clock call", dict(warm_steps=0, profile_steps=1), 2
    else:
        step_timer, timing, measure, windows = do_bench_steps, "do_bench median", {}, 16
    print(header(f"Training step on one GPU: {cfg.train_batch_tokens:,} tokens, {cfg.num_layers}L d={cfg.model_dim}"))
    if smoke:
        print("SMOKE RUN (--smoke): a tiny uncompiled model, one call per timing; the figures mean nothing.\n")
    not_h100 = "" if "H100" in name else f" (this device, {name}, is not an H100: the peak used is the H100's)"
    print(f"FLOPs/token = 6N + 6*L*d*T (N = matrix params incl. tied head); MFU = FLOPs/token x tokens/s / "
          f"{H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s, the H100 SXM bf16 dense datasheet peak{not_h100}. "
          f"Timing: {timing} over about {steps} whole steps after {measure.get('warm_steps', COMPILE_STEPS)} compile steps.\n")
    rows = [measure_training_step_fitting(cfg, backend, device, steps, step_timer, **measure) for backend in ("reference", "triton")]
    if "ms/step" in rows[0] and "ms/step" in rows[1]:
        rows[0]["speed-up"], rows[1]["speed-up"] = 1.0, rows[0]["ms/step"] / rows[1]["ms/step"]
    print(table([{k: v for k, v in r.items() if k != "shares"} for r in rows]))
    for row in rows:
        if row["shares"]:
            print(f"\nShare of GPU kernel time, {row['backend']} backend (kernels inside the optimizer step count as "
                  f"optimizer; the rest classified by kernel name)\n")
            print(table(row["shares"]))
    if skip_eval:
        return
    print(f"\nEvaluation, triton backend, random tokens: window {cfg.eval_seq_len}, stride {cfg.eval_stride}, "
          f"{cfg.eval_batch_seqs} windows/batch; TTT chunks of {cfg.ttt_chunk_tokens} (s/chunk = (t(3 chunks) - t(1 chunk)) / 2). "
          f"Projection: time = {VAL_TOKENS:,} tokens / (tokens/s per GPU x {EVAL_GPUS}).\n")
    print(table([measure_eval(cfg, "triton", device, windows=windows * cfg.eval_batch_seqs,
                                   timer=wall_clock_median(device), warm_up=not smoke)]))


if __name__ == "__main__":
    main(sys.argv[1:])
