"""BigramHash kernels (kernels/ops/bigram.py) against kernels.reference.

Hash and gather are exact (torch.equal). The table gradient is a sum, compared with an fp64
scatter-add within the dtype's tolerance; the deterministic mode must repeat its bits, and the
atomic mode's run-to-run bit agreement is reported (the interpreter runs programs in order, so
only a GPU run says anything about it). Buckets are kept small on the CPU (the deterministic
backward runs one interpreted program per bucket).
"""
import pytest
import torch

import kernels
from kernels import _launch, reference
from kernels.ops import bigram
from tests.conftest import DEVICE
from tests.kernels.gpu_tiles import is_power_of_two
from tests.tolerances import assert_close

# (B, T, D, buckets): T=1, odd T, D not a power of two, D past MAX_BLOCK_D (two column blocks),
# the model's D, the smallest bucket count. (2048 buckets: the hash test here, everything on the GPU.)
CASES = [(1, 1, 16, 37), (3, 1, 8, 37), (2, 7, 96, 37), (3, 33, 300, 19), (2, 65, 128, 61), (4, 50, 5, 2)]


def make_ids(B, T, seed, vocab=1024):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    ids.view(-1)[:: max(1, ids.numel() // 5)] = vocab - 1  # the vocab edge, 1023 for the model
    return ids.to(DEVICE)


def make_table(buckets, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(buckets, D, generator=gen).to(DEVICE, dtype)


def reference_grad(ids, grad, buckets):
    """Exact table gradient: fp64 scatter-add of the output-gradient rows into their buckets."""
    rows = grad.reshape(-1, grad.shape[-1]).double()
    index = reference.bigram_hash(ids, buckets).reshape(-1)
    return torch.zeros(buckets, grad.shape[-1], dtype=torch.float64, device=grad.device).index_add_(0, index, rows)


def table_grad(ids, table, grad, deterministic):
    table = table.detach().requires_grad_()
    bigram.bigram_embed(ids, table, deterministic).backward(grad)
    return table.grad


def test_outputs_are_poisoned_in_tests():
    assert _launch.POISON


@pytest.mark.parametrize("buckets", [2, 37, 2048])
def test_hash_matches_reference(buckets):
    ids = make_ids(3, 41, seed=buckets)
    got = bigram.bigram_hash(ids, buckets)
    assert got.dtype == torch.int64
    assert torch.equal(got, reference.bigram_hash(ids, buckets))
    assert torch.all(got[:, 0] == buckets - 1)  # position 0 of every row


def test_hash_wraps_in_int32_like_the_reference():
    # ids past 59,138 overflow 36313 * id in int32; the XOR can then be negative: floor-mod like torch.
    ids = torch.tensor([[0, 59139, 100_000, 2**20, 2**31 - 1, 5, -3, 7]], device=DEVICE)
    for buckets in (37, 2048):
        assert torch.equal(bigram.bigram_hash(ids, buckets), reference.bigram_hash(ids, buckets))


def test_hash_of_leading_dims_and_int32_ids():
    ids = make_ids(6, 9, seed=3).reshape(2, 3, 9).to(torch.int32)
    assert torch.equal(bigram.bigram_hash(ids, 37), reference.bigram_hash(ids, 37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,D,buckets", CASES)
def test_forward_and_gradients_match_reference(B, T, D, buckets, dtype):
    ids = make_ids(B, T, seed=B * T + D)
    table = make_table(buckets, D, dtype, seed=D)
    out = bigram.bigram_embed(ids, table)
    assert out.dtype == dtype and out.shape == (B, T, D)
    assert torch.equal(out, reference.bigram_embed(ids, table))
    grad = torch.randn(B, T, D, device=DEVICE).to(dtype)
    exact = reference_grad(ids, grad, buckets)
    for deterministic in (False, True):
        got = table_grad(ids, table, grad, deterministic)
        assert got.dtype == dtype and got.shape == table.shape
        assert_close(got, exact.to(dtype), dtype)


def test_block_sizes_are_the_gpus_own():
    # The module picks no interpreter-only block sizes (it does not look at INTERPRET), so every
    # test here already runs the GPU's blocks; D = 128 (the model's) gives 32 positions x 128 columns.
    assert not hasattr(bigram, "INTERPRET")
    assert bigram._position_blocks(128) == (32, 128)
    for D in (1, 5, 8, 96, 128, 300):
        block_p, block_d = bigram._position_blocks(D)
        assert is_power_of_two(block_p) and is_power_of_two(block_d), D  # tl.arange's sizes
        assert block_d <= bigram.MAX_BLOCK_D and block_p * block_d <= bigram.TILE_ELEMENTS, D
    assert is_power_of_two(bigram.HASH_BLOCK) and is_power_of_two(bigram.SORTED_CHUNK)


def test_deterministic_gradient_repeats_its_bits_and_atomic_is_reported(record_property):
    # Many collisions: 37 buckets for 4 x 200 positions, so every bucket sums ~20 rows.
    ids = make_ids(4, 200, seed=11)
    table = make_table(37, 24, torch.float32, seed=1)
    grad = torch.randn(4, 200, 24, device=DEVICE)
    first, second = (table_grad(ids, table, grad, deterministic=True) for _ in range(2))
    assert torch.equal(first, second)
    fast = [table_grad(ids, table, grad, deterministic=False) for _ in range(2)]
    same = torch.equal(fast[0], fast[1])
    record_property("atomic_grad_bits_matched", same)
    print(f"bigram atomic-mode gradient, two runs on {DEVICE}: bits {'matched' if same else 'differed'}")


def test_no_table_gradient_when_table_is_frozen():
    ids = make_ids(2, 5, seed=0)
    table = make_table(37, 8, torch.float32, seed=0)  # requires_grad False
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    (bigram.bigram_embed(ids, table) * x).sum().backward()
    assert table.grad is None and x.grad is not None


def test_non_contiguous_table_and_expanded_gradient():
    ids = make_ids(2, 9, seed=4)
    table = make_table(12, 37, torch.float32, seed=4).T.detach().requires_grad_()  # [37, 12], transposed view
    out = bigram.bigram_embed(ids, table, True)
    assert torch.equal(out, reference.bigram_embed(ids, table))
    out.sum().backward()  # stride-0 gradient
    assert_close(table.grad, reference_grad(ids, torch.ones_like(out), 37).float())


def test_bad_inputs_raise_one_clear_error():
    ids = make_ids(2, 5, seed=0)
    table = make_table(37, 8, torch.float32, seed=0)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        bigram.bigram_embed(ids.float(), table)
    with pytest.raises(ValueError, match="table must be \\[buckets, D\\]"):
        bigram.bigram_embed(ids, table[0])
    with pytest.raises(ValueError, match="buckets must be at least 2"):
        bigram.bigram_hash(ids, 1)
    with pytest.raises(TypeError, match="use float32, bfloat16 or float16"):
        bigram.bigram_embed(ids, table.long())


def test_opcheck():
    ids = make_ids(2, 7, seed=1)
    table = make_table(37, 12, torch.float32, seed=1)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.golf.bigram_hash, (ids, 37), test_utils=checks)
    for deterministic in (False, True):
        torch.library.opcheck(
            torch.ops.golf.bigram_embed, (ids, table.clone().requires_grad_(), deterministic), test_utils=checks
        )
        grad = torch.randn(2, 7, 12, device=DEVICE)
        torch.library.opcheck(
            torch.ops.golf.bigram_embed_backward, (grad, ids, 37, torch.bfloat16, deterministic), test_utils=checks
        )


def test_public_api_routes_to_triton():
    ids = make_ids(2, 7, seed=2)
    table = make_table(37, 12, torch.float32, seed=2)
    with kernels.use_backend("triton"):
        assert kernels._impl("bigram_embed") is bigram.bigram_embed
        assert kernels._impl("bigram_hash") is bigram.bigram_hash
        assert torch.equal(kernels.bigram_embed(ids, table), reference.bigram_embed(ids, table))


def _compile_check(backend, deterministic, buckets=37, B=2, T=9, D=16):
    """Forward + backward through torch.compile(fullgraph=True); a second same-shape input must not recompile."""

    def loss_fn(ids, table, w):
        return (kernels.bigram_embed(ids, table, deterministic) * w).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    with kernels.use_backend("triton"):
        for seed in (0, 1):
            ids = make_ids(B, T, seed=seed)
            table = make_table(buckets, D, torch.float32, seed=seed).requires_grad_()
            w = torch.randn(B, T, D, device=DEVICE)
            with torch.compiler.set_stance("fail_on_recompile" if seed else "default"):
                loss = compiled(ids, table, w)
            loss.backward()
            torch.testing.assert_close(loss, (reference.bigram_embed(ids, table) * w).sum().detach())
            assert_close(table.grad, reference_grad(ids, w, buckets).float())


@pytest.mark.parametrize("deterministic", [False, True])
def test_compile_fullgraph_eager_backend_no_recompile(deterministic):
    torch._dynamo.reset()
    _compile_check("eager", deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_compile_inductor(deterministic):
    torch._dynamo.reset()
    _compile_check("inductor", deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_shape_on_gpu(dtype, record_property):
    # ids [48, 2048] over the real vocab, table 2048 x 128: gather exact, gradients within tolerance,
    # deterministic bits repeat, atomic bit agreement reported.
    ids = make_ids(48, 2048, seed=0)
    table = make_table(2048, 128, dtype, seed=0)
    assert torch.equal(bigram.bigram_embed(ids, table), reference.bigram_embed(ids, table))
    grad = torch.randn(48, 2048, 128, device=DEVICE).to(dtype)
    exact = reference_grad(ids, grad, 2048)
    det = [table_grad(ids, table, grad, True) for _ in range(2)]
    fast = [table_grad(ids, table, grad, False) for _ in range(2)]
    assert torch.equal(det[0], det[1])
    for got in det + fast:
        assert_close(got, exact.to(dtype), dtype)
    same = torch.equal(fast[0], fast[1])
    record_property("atomic_grad_bits_matched", same)
    print(f"bigram atomic-mode gradient [48, 2048] {dtype}, two runs: bits {'matched' if same else 'differed'}")
