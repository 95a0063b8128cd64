"""What every benchmark shares: timing, the copy-bandwidth ceiling, and the printed table."""
import datetime
import subprocess

import torch


def require_gpu(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: benchmarks time CUDA kernels; run it on a machine with a GPU")


def median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (warm-up included, L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated while fn runs, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_variants(variants: dict, make_run) -> dict:
    """{name: (median ms, peak extra bytes)} of make_run(fn) for each variant; one untimed call
    first, so compilation and autotuning stay outside the timing."""
    timed = {}
    for name, fn in variants.items():
        run = make_run(fn)
        run()
        timed[name] = (median_ms(run), peak_extra_bytes(run))
    return timed


def variant_rows(pass_name: str, timed: dict, flops: int, flops_column: str = "TFLOP/s") -> list[dict]:
    """Table rows from time_variants' result: time, achieved TFLOP/s for `flops`, peak extra
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


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write bytes / time): the ceiling memory-bound kernels are judged by."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def compiled(fn):
    """torch.compile(fn), the fair 'compiled reference' baseline."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


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
