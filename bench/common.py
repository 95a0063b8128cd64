"""What every benchmark shares: timing, the copy-bandwidth ceiling, and the printed table."""
import argparse
import datetime
import os
import subprocess
import sys
import time

import torch


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


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device) -> float:
    """Wall-clock milliseconds of one synchronised call of fn."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return 1e3 * (time.perf_counter() - t0)


def variant_rows(pass_name: str, timed: dict, flops: int, flops_column: str = "TFLOP/s") -> list[dict]:
    """Table rows from Bench.time_variants' result: time, achieved TFLOP/s for `flops`, peak extra
    memory and the speed-ups over the "eager reference" and "compiled reference" variants."""
    eager_ms, compiled_ms = timed["eager reference"][0], timed["compiled reference"][0]
    return [
        {
            "pass": pass_name,
            "variant": name,
            "median ms": ms,
            flops_column: flops / ms / 1e9,
            "peak extra MiB": peak / 2**20,
            "speed-up vs eager": eager_ms / ms,
            "speed-up vs compiled": compiled_ms / ms,
        }
        for name, (ms, peak) in timed.items()
    ]


class Bench:
    """Where and how a kernel benchmark runs, from its command line.

    The real run: CUDA, the model's shapes, do_bench medians, Inductor for the compiled baseline.
    --smoke: tiny shapes and one wall-clock call per timing, on the GPU or else on the CPU through
    Triton's interpreter (TRITON_INTERPRET=1) with the compiled baseline traced by aot_eager (the
    same fullgraph trace, no C++ build): the script checked end to end in seconds, its figures
    meaningless.
    """

    def __init__(self, script: str, argv=None):
        parser = argparse.ArgumentParser(prog=f"python -m {script}", description=f"{script}: see its docstring")
        parser.add_argument("--smoke", action="store_true", help="tiny shapes, one call per timing: checks the script, figures mean nothing")
        self.smoke = parser.parse_args(argv).smoke
        self.device = bench_device(script, self.smoke)
        self.cuda = self.device == "cuda"

    def shapes(self, real, smoke):
        """The model's shapes, or the tiny ones under --smoke."""
        return smoke if self.smoke else real

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

    def synchronize(self) -> None:
        synchronize(self.device)

    def peak_extra_bytes(self, fn) -> int:
        """Peak bytes allocated while fn runs, beyond what was allocated before it (0 on the CPU)."""
        if not self.cuda:
            fn()
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def time_variants(self, variants: dict, make_run) -> dict:
        """{name: (median ms, peak extra bytes)} of make_run(fn) for each variant; one untimed call
        first, so compilation and autotuning stay outside the timing."""
        timed = {}
        for name, fn in variants.items():
            run = make_run(fn)
            run()
            timed[name] = (self.ms(run), self.peak_extra_bytes(run))
        return timed

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
        return header(title) + smoke


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
