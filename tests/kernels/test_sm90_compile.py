"""Every Triton kernel compiles for the H100 (sm_90a) at the model's shapes, with no GPU needed:
bench/sm90_compile.py run as a user would, in a process without Triton's interpreter."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import triton

from bench import sm90_compile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
needs_nvidia_backend = pytest.mark.skipif(
    not os.path.exists(os.path.join(NVIDIA_BIN, "cuobjdump")),
    reason=f"this triton has no NVIDIA backend tools in {NVIDIA_BIN}",
)
# Products that must run on Hopper's tensor cores in bf16; an mma.sync or FMA fallback would be a silent 2-10x loss.
DOT_KERNELS = {
    "_xsa_fwd_kernel", "_xsa_bwd_dkdv_kernel", "_xsa_bwd_dq_kernel",
    "_sym_gram_kernel", "_ns_update_kernel",
    "_softcap_ce_fwd_kernel", "_softcap_ce_dlogits_kernel",
    "_relu2_gemm_kernel",
}


def triton_kernels_in_package() -> set[str]:
    """Names of the launchable Triton kernels (JIT functions named *_kernel, autotuned or not) in kernels/ and kernels/ops/."""
    names = set()
    for package in ("kernels", "kernels.ops"):
        for file in sorted(os.listdir(os.path.join(REPO, *package.split(".")))):
            if not file.endswith(".py") or file == "__init__.py":
                continue
            module = importlib.import_module(f"{package}.{file[:-3]}")
            for name, obj in vars(module).items():
                if name.endswith("_kernel") and hasattr(obj, "fn"):
                    names.add(name)
    return names


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-m", "bench.sm90_compile", "--first-config", "--dtypes", "bfloat16", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"sm90_compile failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
@needs_nvidia_backend
def test_every_kernel_compiles_for_sm90_within_shared_memory(rows):
    compiled = {r["kernel"] for r in rows}
    missing = triton_kernels_in_package() - compiled
    assert not missing, f"kernels no preflight case launches (add one to bench/sm90_compile._cases): {sorted(missing)}"
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]


@pytest.mark.slow
@needs_nvidia_backend
def test_bf16_products_use_hopper_wgmma(rows):
    dots = [r for r in rows if r["kernel"] in DOT_KERNELS]
    assert {r["kernel"] for r in dots} == DOT_KERNELS
    assert all(r["mma"] == "wgmma" for r in dots), [(r["case"], r["kernel"], r["mma"]) for r in dots if r["mma"] != "wgmma"]


def test_problems_flag_errors_and_launches_without_a_usable_config():
    Row = sm90_compile.Row
    too_big = "over shared memory (300 KiB > 227 KiB): the autotuner drops it"
    fits = [Row("a", "_k", "BLOCK=64"), Row("a", "_k", "BLOCK=256", status=too_big)]
    assert sm90_compile.problems(fits) == []  # the autotuner still has one config
    none_fit = [Row("b", "_k", "BLOCK=256", status=too_big)]
    assert sm90_compile.problems(none_fit) == ["b: _k: no config compiles within the H100's limits"]
    broken = [Row("c", "_k", "BLOCK=64", status="compile error: CompilationError: bad"), Row("c", "_k", "BLOCK=32")]
    assert sm90_compile.problems(broken) == ["c: _k [BLOCK=64]: compile error: CompilationError: bad"]


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "bench.sm90_compile"], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "sm90_compile: TRITON_INTERPRET=1 replaces the kernels with the interpreter; unset it and run again"
    ]
