"""Compile every Triton kernel for the H100 (sm_90a) on any machine, GPU or not, and report what
each compiled variant would use: shared memory, registers, local memory (spills), and whether
its products run on Hopper's warp-group MMA (wgmma) or the older mma.sync path.

    python -m bench.sm90_compile                  # every autotune config of every launch
    python -m bench.sm90_compile --first-config   # one config per launch (quick; what CI runs)
    python -m bench.sm90_compile --json out.json  # the same rows, machine-readable
    python -m bench.sm90_compile --summary        # one line per kernel and dtype

Why: the CPU tests run the kernels in Triton's interpreter, in fp32. Nothing there compiles the
bf16 code the GPU runs, checks that an autotune config fits in 227 KiB of shared memory (the
autotuner silently drops one that does not; a launch with none left fails), or shows spills.
This does, with Triton's own compiler and ptxas, before any GPU time is spent.

How: each public op runs on CPU tensors of the model's real shapes (SPEC's defaults) with
`torch.library.wrap_triton` replaced by a recorder, so every Triton launch the op would make on a
GPU is captured (arguments, constexprs, launch options) without running. Each captured launch is
then compiled with `JITFunction.warmup` against an sm_90a target; for an autotuned kernel, once
per config in its list. Needs a Triton with the NVIDIA backend (the PyPI wheel has it); run it
without TRITON_INTERPRET.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

H100_SHARED_BYTES = 232_448  # 227 KiB: the most dynamic shared memory one block may opt into on sm_90
TARGET_ARCH = 90


@dataclasses.dataclass
class Launch:
    case: str
    kernel: object  # a JITFunction or an Autotuner around one
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Row:
    case: str
    kernel: str
    config: str
    shared_kib: float = 0.0
    registers: int = 0
    spill_bytes: int = 0  # per-thread stack + local memory: where ptxas puts spilled registers
    mma: str = "-"
    status: str = "ok"

    @property
    def usable(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- the sm_90a target


class _HopperTarget:
    """Stands in for Triton's active driver: a current device and stream for the JIT cache key, and
    the sm_90a target to compile for. Only compilation (warmup) ever reaches it; nothing launches."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", TARGET_ARCH, 32)


@contextlib.contextmanager
def _hopper_driver():
    from triton.runtime import driver

    previous = driver._active  # reset_active() would look for a real driver, and a CPU machine has none
    driver.set_active(_HopperTarget())
    try:
        yield
    finally:
        driver._active = previous


# ----------------------------------------------------------------------------- capture


@contextlib.contextmanager
def _recording(launches: list, case: str):
    """torch.library.wrap_triton(k)[grid](*args, **kwargs) records instead of launching."""

    def wrap_triton(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append(Launch(case, kernel, args, kwargs))

        return _Grid()

    real = torch.library.wrap_triton
    torch.library.wrap_triton = wrap_triton
    try:
        yield
    finally:
        torch.library.wrap_triton = real


def _body(op):
    """The Python body of a torch.library.triton_op: on CPU tensors the op itself dispatches to the
    eager reference, so the body is called directly to reach its Triton launches."""
    fn = getattr(op, "_init_fn", None)
    if fn is None:
        raise SystemExit(f"sm90_compile: {op} has no _init_fn; this torch version hides triton_op bodies")
    return fn


def _cases(dtypes, cfg=None) -> list[tuple[str, object]]:
    """(case name, thunk) for every launch the model makes on a GPU, at cfg's shapes (SPEC's by default).
    `dtypes`: the activation dtypes to compile the dot-product kernels for (the model's bf16; fp32
    is what the GPU tests also run)."""
    from bench.common import micro_batch
    from kernels import reference
    from kernels.ops import bigram, fakequant, softcap_ce
    from kernels.ops import newton_schulz as ns
    from kernels.ops import relu2_mlp as mlp
    from kernels.ops import xsa_attention as xsa
    from model.config import Config
    from model.gpt import GPT
    from model.optim import muon_coeffs

    cfg = cfg or Config()
    model = GPT(cfg)
    B, T = micro_batch(cfg)
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
    empty = lambda *shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731
    cases = []

    # int6 fake-quant: every distinct linear weight shape, fp32 master -> bf16 operand; the export's quantise
    shapes = sorted({tuple(p.shape) for p in model.param_groups()["matrix"]})
    for rows, cols in shapes:
        w = empty(rows, cols, dtype=torch.float32)
        cases.append((f"int6_fakequant {rows}x{cols}", lambda w=w: _body(fakequant.int6_fakequant_op)(w, torch.bfloat16)))
        cases.append((f"int6_quantize {rows}x{cols}", lambda w=w: _body(fakequant.int6_quantize_op)(w)))

    # BigramHash: ids [B, T] with the model's table (dtype as the model holds it); a preset without
    # BigramHash (the frontier) launches none of its kernels
    if model.bigram is not None:
        ids = torch.zeros(B, T, dtype=torch.int64)
        table = model.bigram.table.detach()
        buckets, bdim = table.shape
        grad = empty(B, T, bdim, dtype=table.dtype)
        cases.append(("bigram_hash", lambda: _body(bigram.bigram_hash_op)(ids, buckets)))
        cases.append(("bigram_embed", lambda: _body(bigram.bigram_embed_op)(ids, table, False)))
        for deterministic in (False, True):
            cases.append((
                f"bigram_embed_backward deterministic={deterministic}",
                lambda d=deterministic: _body(bigram.bigram_embed_backward_op)(grad, ids, buckets, table.dtype, d),
            ))

    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        # XSA attention at the training micro-batch: plain causal, XSA, and the frontier's XSA with
        # segments and the output gate; the backward in both modes (one pass with atomic dQ, deterministic)
        q, k, v = empty(B, T, H, D, dtype=dtype), empty(B, T, Hkv, D, dtype=dtype), empty(B, T, Hkv, D, dtype=dtype)
        stats = empty(B, H, T, dtype=torch.float32)
        qkv = (q, k, v)
        cu_seqlens = torch.tensor([0, B * T], dtype=torch.int32)  # the offsets' values do not change the code
        gate = empty(B, T, H, dtype=torch.float32)
        for use_xsa, segments, g in ((False, None, None), (True, None, None), (True, cu_seqlens, gate)):
            what = f"xsa={use_xsa}" + (" segments+gate" if segments is not None else "")
            # thunks run after the loop: every tensor they use is bound as a default, not looked up late
            cases.append((
                f"xsa_attention_fwd {name} {what}",
                lambda x=use_xsa, qkv=qkv, c=segments, g=g: _body(xsa.xsa_attention_fwd_op)(*qkv, x, c, g, False),
            ))
            for deterministic in (False, True):
                cases.append((
                    f"xsa_attention_bwd {name} {what} deterministic={deterministic}",
                    lambda x=use_xsa, qkv=qkv, s=stats, c=segments, g=g, d=deterministic: _body(xsa.xsa_attention_bwd_op)(
                        qkv[0], *qkv, qkv[0], s, s, x, c, g, d
                    ),
                ))
        # Newton-Schulz: one stacked launch per Muon shape group, computing in `dtype`
        coeffs = [c for triple in reference.per_step_coeffs(cfg.muon_backend_steps, muon_coeffs(cfg)) for c in triple]
        counts = {}
        for p in model.param_groups()["matrix"]:
            counts[tuple(p.shape)] = counts.get(tuple(p.shape), 0) + 1
        for (rows, cols), count in sorted(counts.items()):
            G = empty(count, rows, cols, dtype=torch.float32)
            cases.append((
                f"newton_schulz {name} {count}x{rows}x{cols}",
                lambda G=G, dt=dtype: _body(ns.newton_schulz_op)(G, cfg.muon_backend_steps, coeffs, dt),
            ))
        # soft-capped CE over the tied head: the micro-batch's hidden states, the model's head weight
        x = empty(B * T, cfg.model_dim, dtype=dtype)
        weight = model.tok_emb.weight.detach()
        targets = torch.zeros(B * T, dtype=torch.int64)
        per_token = empty(B * T, dtype=torch.float32)
        cases.append((f"softcap_ce_fwd {name}", lambda x=x: _body(softcap_ce.softcap_ce_fwd_op)(x, weight, targets, 30.0)))
        cases.append((
            f"softcap_ce_dlogits {name}",
            lambda x=x: _body(softcap_ce.softcap_ce_dlogits_op)(x, weight, targets, per_token, per_token, per_token, 30.0),
        ))
        # the phased TTT's head with per-document LoRA: a few documents of TTT_EVAL_SEQ_LEN rows, rank TTT_LORA_RANK
        docs, rows, rank = 4, cfg.ttt_eval_seq_len, cfg.ttt_lora_rank
        xl, ul = empty(docs * rows, cfg.model_dim, dtype=dtype), empty(docs * rows, rank, dtype=dtype)
        lora_b = empty(docs, cfg.vocab_size, rank, dtype=torch.float32)
        tl_, pl = torch.zeros(docs * rows, dtype=torch.int64), empty(docs * rows, dtype=torch.float32)
        cases.append((f"softcap_ce_lora_fwd {name}",
                      lambda x=xl, u=ul, b=lora_b, t=tl_: _body(softcap_ce.softcap_ce_lora_fwd_op)(x, weight, u, b, t, 30.0)))
        cases.append((
            f"softcap_ce_lora_dlogits {name}",
            lambda x=xl, u=ul, b=lora_b, t=tl_, p=pl: _body(softcap_ce.softcap_ce_lora_dlogits_op)(x, weight, u, b, t, p, p, p, 30.0),
        ))
        # relu^2 MLP: the bodies run their cuBLAS half as CPU matmuls, so 8192 tokens stand in for the
        # micro-batch's 98,304 (the same autotune list and constexprs; only the split-K count differs).
        # Both presets' activations, relu^2 (SPEC) and LeakyReLU(0.5)^2 (FRONTIER.md), and the
        # config's slope: each its own constexpr.
        tokens, hidden = 8192, cfg.mlp_hidden
        xs, h = empty(tokens, cfg.model_dim, dtype=dtype), empty(tokens, hidden, dtype=dtype)
        w_up, w_down = empty(hidden, cfg.model_dim, dtype=dtype), empty(cfg.model_dim, hidden, dtype=dtype)
        for slope in sorted({0.0, 0.5, float(cfg.mlp_leaky_slope)}):
            cases.append((
                f"relu2_mlp_fwd {name} slope={slope}",
                lambda xs=xs, u=w_up, w=w_down, s=slope: _body(mlp.relu2_mlp_fwd_op)(xs, u, w, s),
            ))
            cases.append((
                f"relu2_mlp_bwd {name} slope={slope}",
                lambda xs=xs, h=h, u=w_up, w=w_down, s=slope: _body(mlp.relu2_mlp_bwd_op)(xs, xs, h, u, w, s),
            ))
    return cases


def capture(dtypes, cfg=None) -> list[Launch]:
    """Every distinct Triton launch of every case (a kernel launched again with the same constexprs
    and argument types, e.g. each Newton-Schulz step, is compiled once)."""
    launches, seen = [], set()
    for case, thunk in _cases(dtypes, cfg):
        recorded = []
        with _recording(recorded, case):
            thunk()
        for launch in recorded:
            key = (id(launch.kernel), _signature_key(launch))
            if key not in seen:
                seen.add(key)
                launches.append(launch)
    return launches


def _signature_key(launch: Launch) -> tuple:
    def kind(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype)
        if isinstance(a, bool) or a is None or isinstance(a, str):
            return ("const", a)
        if isinstance(a, int):
            return ("int", a == 1, a % 16 == 0)  # Triton specialises ints equal to 1 and multiples of 16
        return (type(a).__name__,)

    def constexpr_kind(v):  # a float passed by name is a constexpr (the MLP's slope): one variant per value
        return ("const", v) if isinstance(v, float) else kind(v)

    return tuple(kind(a) for a in launch.args) + tuple(sorted((k, constexpr_kind(v)) for k, v in launch.kwargs.items()))


# ----------------------------------------------------------------------------- compile


def _jit_and_configs(kernel):
    """(the JITFunction, [autotune config or None])."""
    from triton.runtime.jit import JITFunction

    configs = list(getattr(kernel, "configs", None) or [None])
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn, configs


def _config_kwargs(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "all_kwargs"):
        return {k: v for k, v in config.all_kwargs().items() if v is not None}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _describe(kwargs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages"))


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes per thread) from cuobjdump's resource summary of the cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(rf"\b{name}:(\d+)", out)) else -1  # noqa: E731
    return field("REG"), field("STACK") + field("LOCAL")


def _mma_kind(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "-"


def compile_launch(launch: Launch, config) -> Row:
    fn, _ = _jit_and_configs(launch.kernel)
    kwargs = {**launch.kwargs, **_config_kwargs(config)}
    row = Row(case=launch.case, kernel=fn.__name__, config=_describe(kwargs))
    try:
        compiled = fn.warmup(*launch.args, grid=(1,), **kwargs)
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a row, not a crash
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        row.status = f"compile error: {type(exc).__name__}: {first[:160]}"
        return row
    row.shared_kib = compiled.metadata.shared / 1024
    row.registers, row.spill_bytes = _resources(compiled.asm["cubin"])
    row.mma = _mma_kind(compiled.asm["ptx"])
    if compiled.metadata.shared > H100_SHARED_BYTES:
        row.status = f"over shared memory ({row.shared_kib:.0f} KiB > {H100_SHARED_BYTES // 1024} KiB): the autotuner drops it"
    return row


def run(first_config: bool, dtypes, cfg=None) -> list[Row]:
    rows = []
    with _hopper_driver():
        for launch in capture(dtypes, cfg):
            _, configs = _jit_and_configs(launch.kernel)
            for config in configs[:1] if first_config else configs:
                rows.append(compile_launch(launch, config))
    return rows


def problems(rows: list[Row]) -> list[str]:
    """What would fail on the GPU: a compiler error, or a launch none of whose configs fits."""
    found = [f"{r.case}: {r.kernel} [{r.config}]: {r.status}" for r in rows if r.status.startswith("compile error")]
    launches = {}
    for r in rows:
        launches.setdefault((r.case, r.kernel), []).append(r)
    for (case, kernel), variants in launches.items():
        if not any(v.usable for v in variants):
            found.append(f"{case}: {kernel}: no config compiles within the H100's limits")
    return found


def _table(rows: list[Row]) -> str:
    from bench.common import table

    return table([
        {
            "case": r.case, "kernel": r.kernel, "config": r.config, "shared KiB": round(r.shared_kib, 1),
            "regs": r.registers, "spill B": r.spill_bytes, "mma": r.mma, "status": r.status,
        }
        for r in rows
    ])


def _summary(rows: list[Row]) -> str:
    """One line per (kernel, dtype): how many variants compiled, and the range over them."""
    from bench.common import table

    groups = {}
    for r in rows:
        dtype = next((d for d in ("bfloat16", "float32", "float16") if d in r.case), "-")
        groups.setdefault((r.kernel, dtype), []).append(r)
    return table([
        {
            "kernel": kernel, "dtype": dtype, "variants": len(vs),
            "shared KiB": f"{min(v.shared_kib for v in vs):.0f}-{max(v.shared_kib for v in vs):.0f}",
            "max regs": max(v.registers for v in vs), "max spill B": max(v.spill_bytes for v in vs),
            "spilling variants": sum(v.spill_bytes > 0 for v in vs),
            "mma": "/".join(sorted({v.mma for v in vs})), "ok": sum(v.usable for v in vs),
        }
        for (kernel, dtype), vs in groups.items()
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any other --name value is a model/config.py setting (--preset NAME too): the shapes compiled.")
    parser.add_argument("--first-config", action="store_true", help="compile only the first autotune config of each launch")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="activation dtypes for the dot kernels (default: bfloat16,float32)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--summary", action="store_true", help="one line per kernel and dtype instead of one per variant")
    args, settings = parser.parse_known_args(argv)
    from model.config import load_config

    try:  # the model's shapes: --preset NAME and any --name value, as train.py resolves them
        cfg, _ = load_config(settings, prog="python -m bench.sm90_compile")
    except ValueError as exc:
        print(f"sm90_compile: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sm90_compile: TRITON_INTERPRET=1 replaces the kernels with the interpreter; unset it and run again", file=sys.stderr)
        return 2
    try:
        dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    except AttributeError as exc:
        print(f"sm90_compile: --dtypes: {exc}; use names like bfloat16,float32", file=sys.stderr)
        return 2
    import triton

    started = time.perf_counter()
    rows = run(args.first_config, dtypes, cfg)
    print(f"## Triton kernels compiled for sm_{TARGET_ARCH}a (H100), triton {triton.__version__}, torch {torch.__version__}\n")
    print(_summary(rows) if args.summary else _table(rows))
    print(f"\n{len(rows)} variants compiled in {time.perf_counter() - started:.0f} s; shared-memory limit {H100_SHARED_BYTES // 1024} KiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    found = problems(rows)
    for line in found:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
