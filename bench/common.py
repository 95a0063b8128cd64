"""What every kernel benchmark shares: its command line and the config it resolves, the model whose
shapes it runs at, timing and peak memory, the one row builder, and the printed table.

    python -m bench.<family> [--smoke] [--preset NAME] [--name value ...]

Shapes are never typed into a script: each derives them from the resolved `Config` and the `GPT`
it builds (the micro-batch from train_batch_tokens // grad_accum_total, the heads, dims, vocab,
tables and matrices from the model), so `--preset NAME` and any `--name value` setting, resolved by
model.config.load_config exactly as train.py resolves them, bench another system's shapes.
--smoke prepends SMOKE_ARGS (tiny, ragged shapes); settings given after it win.
"""
import collections
import datetime
import functools
import math
import os
import subprocess
import sys
import time

import torch

from model.config import Config, help_text, load_config, setting_warnings
from model.distributed import synchronize

# --smoke's model and micro-batch: one layer (with XSA and VE), d = 48 in 3 heads of 16 over 1 KV
# head, MLP 144, vocab 200, bigram 64 x 24, one micro-batch of 2 x 70 tokens. Odd sizes on purpose:
# ragged against every kernel's blocks, so a smoke run on a GPU exercises the masks; one layer
# because Muon's stacks run in the interpreter on the CPU.
SMOKE_ARGS = ["--num_layers", "1", "--model_dim", "48", "--num_heads", "3", "--num_kv_heads", "1",
              "--rope_dims", "8", "--mlp_mult", "3", "--vocab_size", "200", "--xsa_last_n", "1",
              "--bigram_vocab_size", "64", "--bigram_dim", "24", "--ve_enabled", "1", "--ve_dim", "16",
              "--ve_layers", "0", "--train_seq_len", "70", "--train_batch_tokens", "140", "--grad_accum_total", "1"]


def bench_config(script: str, argv=None) -> tuple[Config, bool]:
    """(config, smoke) from the command line: --smoke, then --preset and settings as train.py takes
    them (environment variables included). A bad setting: its line(s) and exit; --help: the settings."""
    argv = list(sys.argv[1:] if argv is None else argv)
    smoke = "--smoke" in argv
    if smoke:
        argv = SMOKE_ARGS + [a for a in argv if a != "--smoke"]
    prog = f"python -m {script}"
    try:
        cfg, flags = load_config(argv, prog=prog)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}".replace("\n", f"\n{prog}: ")) from None
    if "--help" in flags:
        print(f"{prog} [--smoke] [--preset NAME] [--name value ...]: benchmarks at the model's shapes.\n"
              f"--smoke: tiny shapes (bench.common.SMOKE_ARGS, then your settings), one call per timing.\n")
        print(help_text(prog))
        raise SystemExit(0)
    if "--dry-run" in flags:
        raise SystemExit(f"{prog}: --dry-run is train.py's; a benchmark has nothing to print without running")
    for warning in setting_warnings():
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    return cfg, smoke


def build_model(cfg: Config):
    """The GPT the config describes, on the CPU: what the shapes are read from, never timed."""
    from model.gpt import GPT

    torch.manual_seed(cfg.seed)
    return GPT(cfg)


def micro_batch(cfg: Config) -> tuple[int, int]:
    """(sequences, tokens per sequence) of one training micro-batch: what one GPU runs per forward."""
    return cfg.train_batch_tokens // cfg.grad_accum_total // cfg.train_seq_len, cfg.train_seq_len


def bench_device(script: str, smoke: bool) -> str:
    """"cuda"; or "cpu" for a smoke run through Triton's interpreter; else one line and exit."""
    if torch.cuda.is_available():
        return "cuda"
    if not smoke:
        raise SystemExit(f"{script}: benchmarks time CUDA kernels; run it on a machine with a GPU")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(f"{script} --smoke: no GPU here, so the kernels need Triton's interpreter: run it with TRITON_INTERPRET=1")
    return "cpu"


def median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (warm-up included, L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def wall_ms(fn, device) -> float:
    """Wall-clock milliseconds of one synchronised call of fn."""
    device = torch.device(device)
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return 1e3 * (time.perf_counter() - t0)


# One variant's measurement: median ms, peak bytes allocated beyond what was allocated before the
# call (NaN where not measured: the CPU), and the CUDA-graph replay's ms where asked for (else None).
Timed = collections.namedtuple("Timed", "ms peak_bytes graph_ms", defaults=(None,))

# Throughput: work / ms / PER_MS[unit], i.e. FLOPs -> TFLOP/s, bytes -> GB/s.
PER_MS = {"TFLOP/s": 1e9, "GB/s": 1e6}
REFERENCES = {"eager": "eager reference", "compiled": "compiled reference"}


def variant_rows(labels, timed: dict, *, flops: float = None, nbytes: float = None, column: str = None,
                 baselines: dict = REFERENCES, ceiling: tuple = None) -> list[dict]:
    """The table rows of one measured case, one per variant, the same columns for every family:

    labels (dict of leading columns; a string s means {"pass": s}) | variant | median ms |
    throughput: `flops` as TFLOP/s or `nbytes` as GB/s, headed `column` (default the unit) |
    "of <name>": the throughput over `ceiling` = (name, value in the unit), when given |
    "CUDA-graph ms", when timed | "peak extra MiB", left out when not measured (the CPU) |
    "speed-up vs <short>" for each baseline {short: variant name}, and its graph speed-up when timed.

    `timed`: {variant: Timed or (ms, peak bytes)}, as Bench.measure returns.
    """
    if (flops is None) == (nbytes is None):
        raise ValueError("variant_rows: give the work as exactly one of flops= or nbytes=")
    unit, work = ("TFLOP/s", flops) if nbytes is None else ("GB/s", nbytes)
    column = column or unit
    labels = {"pass": labels} if isinstance(labels, str) else labels
    timed = {name: Timed(*t) for name, t in timed.items()}
    with_memory = any(not math.isnan(t.peak_bytes) for t in timed.values())
    with_graph = any(t.graph_ms is not None for t in timed.values())
    rows = []
    for name, t in timed.items():
        throughput = work / t.ms / PER_MS[unit]
        row = {**labels, "variant": name, "median ms": t.ms, column: throughput}
        if ceiling is not None:
            row[f"of {ceiling[0]}"] = throughput / ceiling[1]
        if with_graph:
            row["CUDA-graph ms"] = t.graph_ms
        if with_memory:
            row["peak extra MiB"] = t.peak_bytes / 2**20
        for short, base in baselines.items():
            row[f"speed-up vs {short}"] = timed[base].ms / t.ms
        if with_graph:
            for short, base in baselines.items():
                row[f"graph speed-up vs {short}"] = timed[base].graph_ms / t.graph_ms
        rows.append(row)
    return rows


class Bench:
    """Where and how a kernel benchmark runs, from its command line.

    The real run: CUDA, the configured model's shapes, do_bench medians, Inductor for the compiled
    baseline. --smoke: tiny shapes (SMOKE_ARGS) and one wall-clock call per timing, on the GPU or
    else on the CPU through Triton's interpreter (TRITON_INTERPRET=1) with the compiled baseline
    traced by aot_eager (the same fullgraph trace, no C++ build): the script checked end to end in
    seconds, its figures meaningless.
    """

    def __init__(self, script: str, argv=None):
        self.cfg, self.smoke = bench_config(script, argv)  # a bad setting fails before the device check
        self.device = bench_device(script, self.smoke)
        self.cuda = self.device == "cuda"

    @functools.cached_property
    def model(self):
        """The configured GPT (on the CPU; built once, on first use)."""
        return build_model(self.cfg)

    def ms(self, fn, warmup: int = 25, rep: int = 100) -> float:
        return wall_ms(fn, self.device) if self.smoke else median_ms(fn, warmup, rep)

    def graph_ms(self, fn) -> float:
        """Median ms of fn replayed as a CUDA graph (triton.testing.do_bench_cudagraph): the GPU's
        time without the host's launch overhead; NaN, with the reason on stderr, where fn cannot be
        captured. Under --smoke, one plain call."""
        if self.smoke:
            return self.ms(fn)
        import triton.testing

        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # a capture failure must not cost the rest of the table
            print(f"CUDA-graph timing failed: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            return float("nan")

    def peak_extra_bytes(self, fn) -> float:
        """Peak bytes allocated while fn runs beyond what was allocated before it
        (torch.cuda.max_memory_allocated); NaN on the CPU, where it is not measured."""
        if not self.cuda:
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def measure(self, runs: dict, graph: bool = False) -> dict:
        """{name: Timed} of each zero-argument run: one untimed call first, so compilation and
        autotuning stay outside the timing (not under --smoke, whose figures mean nothing), then
        the median ms, the peak extra memory and, with `graph`, the CUDA-graph replay's ms."""
        timed = {}
        for name, run in runs.items():
            if not self.smoke:
                run()
            timed[name] = Timed(self.ms(run), self.peak_extra_bytes(run), self.graph_ms(run) if graph else None)
        return timed

    def time_variants(self, variants: dict, make_run) -> dict:
        """measure() of make_run(fn) for each variant fn."""
        return self.measure({name: make_run(fn) for name, fn in variants.items()})

    def copy_bandwidth_gbs(self) -> float:
        """Measured device copy bandwidth (read + write bytes / time): the ceiling memory-bound kernels are judged by."""
        src = torch.empty((1 << 14 if self.smoke else 1 << 29), dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        ms = self.ms(lambda: dst.copy_(src))
        return 2 * src.numel() * src.element_size() / ms / 1e6

    def compiled(self, fn):
        """torch.compile(fn), the fair 'compiled reference' baseline (aot_eager on the CPU: see the class)."""
        backend = "inductor" if self.cuda else "aot_eager"
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

    def header(self, title: str) -> str:
        smoke = "\nSMOKE RUN (--smoke): tiny shapes, one call per timing; the figures mean nothing.\n" if self.smoke else ""
        memory = "" if self.cuda else "\nPeak memory is measured on a GPU only, so its column is left out here.\n"
        return header(title) + f"\nShapes from: {describe(self.cfg)}\n" + smoke + memory


def describe(cfg: Config) -> str:
    """The settings the shapes come from, in one line."""
    B, T = micro_batch(cfg)
    return (f"{cfg.num_layers}L d={cfg.model_dim}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV of {cfg.head_dim}, "
            f"MLP {cfg.mlp_hidden}, vocab {cfg.vocab_size}, micro-batch {B} x {T}")


def header(title: str) -> str:
    """Device, date, versions and commit: the provenance every RESULTS.md table carries."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (
        f"## {title}\n\n{device}, {datetime.date.today().isoformat()}, commit {commit or 'unknown'}, "
        f"torch {torch.__version__}, triton {triton.__version__}\n"
    )


def table(rows: list[dict]) -> str:
    """Markdown table with the keys of the first row as columns; floats printed with 3 significant digits."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
