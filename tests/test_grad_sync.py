"""Training without DDP (model/shard_plan.py, model/grad_sync.py, Muon's sharded step): the plan's
balance, and 2 ranks under gloo against 1 rank on the same tokens. With fp32 communication the
averaged gradients equal the 1-rank run's accumulated ones bit for bit; the weights then agree to
fp32's tolerance, not bit for bit, because Newton-Schulz's batched matmuls see other stacks (one
rank orthogonalises both ranks' matrices in one call) and fp32 matmul bits depend on the batch.
With bf16 communication, within a stated bound. Checkpoints move between 2 ranks and 1; the clip
uses the global norm of the averaged gradient."""
import copy
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import kernels
import train
from model.config import load_config
from model.data import DistributedTokenLoader, write_shard
from model.distributed import AgreedLater, Dist, leave_process_group
from model.gpt import GPT
from model.grad_sync import GradientSync
from model.shard_plan import ShardPlan, newton_schulz_cost, wide_shape
from model.runlog import RunLog
from model.training import build_training_state, training_step
from tests.multiprocess import run_ranks
from tests.tolerances import assert_close

VOCAB = 64
TINY = ["--preset", "smoke", "--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--num_kv_heads", "1",
        "--rope_dims", "8", "--xsa_last_n", "1", "--ve_layers", "1", "--bigram_vocab_size", "31", "--bigram_dim", "8",
        "--ve_dim", "8", "--vocab_size", str(VOCAB), "--train_seq_len", "16", "--train_batch_tokens", "64"]
# bf16 communication rounds each rank's gradient of a matrix to bf16 (relative 2^-9) before averaging,
# and Newton-Schulz amplifies that on these tiny matrices' small singular values (3-5% after 3 steps
# here). Bound: after the steps, each matrix's distance from the 1-rank run's, and the whole model's,
# at most BF16_DRIFT of how far the 1-rank run moved it; averaging wrongly (a rank's own gradient)
# is of order 1.
BF16_DRIFT = 0.1


# ----------------------------------------------------------------------------- the plan
def spec_matrices(**settings):
    cfg, _ = load_config([f"--{k}={v}" for k, v in settings.items()], environ={})
    with torch.device("meta"):
        return GPT(cfg).param_groups()["matrix"]


def test_plan_groups_by_wide_shape_and_balances_newton_schulz_flops():
    matrices = spec_matrices()  # SPEC's model: 11 layers x (q, k, v, out, fc, proj) + bigram and VE projections
    plan = ShardPlan([matrices], world=8, rank=3)
    shapes = {bucket.shape: len(bucket.params) for bucket in plan.buckets}
    # the tall fc [1536, 512] joins the wide proj [512, 1536]: one stack of 22
    assert shapes[(512, 1536)] == 22 and shapes[(512, 512)] == 22 and shapes[(256, 512)] == 22
    assert sorted(id(p) for b in plan.buckets for p in b.params) == sorted(id(p) for p in matrices)
    assert all(wide_shape(p.shape) == b.shape for b in plan.buckets for p in b.params)
    load = plan.load()
    total = sum(newton_schulz_cost(p.shape) for p in matrices)
    assert sum(load) == total
    # no rank holds more than the ideal share plus one largest matrix (longest-processing-time-first's bound)
    assert max(load) <= total / 8 + max(newton_schulz_cost(p.shape) for p in matrices)
    # better than splitting each stack into contiguous slices (22 -> 3 per rank, ranks 7 gets 1 each)
    contiguous = sum(3 * newton_schulz_cost(b.params[0].shape) for b in plan.buckets if len(b.params) == 22)
    assert max(load) < contiguous
    # every rank derives the same plan, and its slots hold exactly its matrices
    other = ShardPlan([matrices], world=8, rank=5)
    assert [b.owners for b in other.buckets] == [b.owners for b in plan.buckets]
    for bucket in plan.buckets:
        offsets = sorted(bucket.flat_offset(i) for i in range(len(bucket.params)))
        assert len(set(offsets)) == len(offsets) and offsets[-1] < 8 * bucket.slot * bucket.numel


def test_plan_order_is_backwards_and_one_rank_owns_everything():
    matrices = spec_matrices(num_layers=3, xsa_last_n=1, ve_layers="1,2")
    plan = ShardPlan([matrices], world=1, rank=0)
    assert all(plan.owns(p) for p in matrices)
    registered = {id(p): i for i, p in enumerate(matrices)}
    first_member = [min(registered[id(p)] for p in b.params) for b in plan.buckets]
    assert first_member == sorted(first_member, reverse=True)  # the bucket backward completes first comes first
    with pytest.raises(ValueError, match="rank 2 must lie in"):
        ShardPlan([matrices], world=2, rank=2)


# ----------------------------------------------------------------------------- 2 ranks vs 1
def make_shards(folder: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(os.path.join(folder, f"fineweb_train_{i:06d}.bin"), rng.integers(0, VOCAB, 3000))


def build(settings, world: int, rank: int, data: str):
    cfg, _ = load_config([*TINY, *settings], environ={})
    ctx = Dist(rank, world, rank, torch.device("cpu"))
    return build_training_state(cfg, ctx, DistributedTokenLoader(data, rank, world, VOCAB))


def run(state, steps: range) -> list[float]:
    losses = []
    for step in steps:
        losses.append(float(training_step(state, 1.0 - 0.1 * step, 0.9 + 0.01 * step)))
        state.step = step + 1
    return losses


def weights(state) -> dict:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close_weights(actual: dict, expected: dict) -> None:
    for name in expected:
        assert_close(actual[name], expected[name], dtype=torch.float32)


EXACT = ["--grad_accum_total", "2", "--grad_clip_norm", "0", "--grad_comm", "fp32"]  # one micro-batch per rank: fp32 averages are exact
BF16 = ["--grad_accum_total", "4", "--grad_clip_norm", "0.05", "--grad_comm", "bf16"]  # two per rank, and a clip that bites


def _worker(rank: int, world: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)  # the 1-rank runs compared with these use one thread too: the same kernels, the same bits
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    try:
        with kernels.use_backend("reference"):
            # fp32: 2 steps, checkpoint, 2 more; then the checkpoint resumed on 2 ranks
            state = build(EXACT, world, rank, folder)
            finish = state.grad_sync.finish
            state.grad_sync.finish = lambda: (finish(), out.setdefault("grads", gradients(state.model)))
            out["losses"] = run(state, range(2))
            checkpoint = copy.deepcopy(state.state_dict())  # a collective: every rank gathers Muon's momentum
            out["muon_state_here"] = len(state.optimizers[0].state)
            out["losses"] += run(state, range(2, 4))
            out["final"] = weights(state)
            resumed = build(EXACT, world, rank, folder)
            resumed.load_state_dict(copy.deepcopy(checkpoint))  # the optimizers adopt the state's tensors
            run(resumed, range(2, 4))
            out["resumed"] = weights(resumed)
            # bf16, 2 micro-batches per rank, clipped: the norms each step clipped by
            bf16 = build(BF16, world, rank, folder)
            assert (state.grad_sync.comm_dtype, bf16.grad_sync.comm_dtype) == (torch.float32, torch.bfloat16)  # GRAD_COMM
            norms, clip = [], bf16.grad_sync.clip_grad_norm_
            bf16.grad_sync.clip_grad_norm_ = lambda max_norm: norms.append(float(clip(max_norm))) or norms[-1]
            run(bf16, range(3))
            out["bf16"], out["bf16_norms"] = weights(bf16), norms
        # parameters only rank 0 uses (a matrix and a small one): the missing gradients count as zeros,
        # and both ranks end with the same averaged gradients (each rank its own matrices')
        used, sometimes = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
        scalar = torch.nn.Parameter(torch.ones(3))
        plan = ShardPlan([[used, sometimes]], world, rank)
        sync = GradientSync(plan, [scalar])
        sync.arm()
        loss = (used * 2.0).sum() + ((sometimes * 4.0).sum() + (scalar * 6.0).sum() if rank == 0 else 0.0)
        loss.backward()
        sync.finish()
        out["partial"] = {"owned": [plan.owns(p) for p in (used, sometimes)], "scalar": scalar.grad.clone(),
                          "matrices": [None if p.grad is None else p.grad.clone() for p in (used, sometimes)]}
        sync.close()
        agreement = AgreedLater("cpu")  # the stop decision: only rank 1 raises its flag, at step 2; then a pause's own
        out["agreed"] = [agreement.post(lambda: (rank == 1 and step >= 2,)) for step in range(4)]
        out["agreed"].append(agreement.now(lambda: (rank == 1,), lambda: (rank == 0,)))
        out["agreed"].append(agreement.post(lambda: (False,)))
        # an export that fails on rank 0 (over the byte budget) ends every rank with its line, none waits
        over = dataclasses.replace(state.cfg, artifact_budget_bytes=1000)
        log = RunLog(os.path.join(folder, "export_run"), rank == 0)
        try:
            train.export_artifact(dataclasses.replace(state, cfg=over), log)
            out["export"] = "no error"
        except (ValueError, train.TrainingError) as e:
            out["export"] = f"{type(e).__name__}: {e}"
        if rank == 0:
            out["checkpoint"] = checkpoint
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        leave_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("grad_sync"))
    make_shards(folder)
    run_ranks(_worker, 2, (2, os.path.join(folder, "init"), folder))
    return folder, [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]


def one_rank(settings, folder, steps, checkpoint=None, first=0, record=None):
    """The 1-rank run; `record` (a dict) gets the gradients the first optimizer step sees."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same kernels
    try:
        with kernels.use_backend("reference"):
            state = build(settings, 1, 0, folder)
            assert state.grad_sync is None  # one process: no communication at all
            if record is not None:
                muon_step = state.optimizers[0].step
                state.optimizers[0].step = lambda: (record.setdefault("grads", gradients(state.model)), muon_step())
            if checkpoint is not None:
                state.load_state_dict(copy.deepcopy(checkpoint))  # as from a file: nothing shared
            losses = run(state, range(first, first + steps))
    finally:
        torch.set_num_threads(threads)
    return state, losses


def assert_equal_weights(a: dict, b: dict) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow  # two spawned processes, three short runs each: about 20 s on two busy cores
def test_two_ranks_with_fp32_communication_match_one_rank(two_ranks):
    folder, (rank0, rank1) = two_ranks
    assert_equal_weights(rank0["final"], rank1["final"])  # every rank applies the same gathered bits
    record = {}
    single, losses = one_rank(EXACT, folder, 4, record=record)
    # the communication is exact: each rank holds the 1-rank run's gradient of its matrices and of
    # every small parameter, bit for bit; together the ranks hold every gradient
    expected = record["grads"]
    for mine in (rank0["grads"], rank1["grads"]):
        assert_equal_weights(mine, expected)
        assert any(name.endswith("skip_weights") for name in mine)  # an AdamW tensor: on every rank
    assert set(rank0["grads"]) | set(rank1["grads"]) == set(expected) and set(rank0["grads"]) != set(expected)
    assert_close_weights(rank0["final"], weights(single))
    # each rank's loss is its micro-batch's; the 1-rank step's is the mean of both
    assert losses == pytest.approx([(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])], rel=1e-5)
    initial = weights(build(EXACT, 1, 0, folder))
    assert not torch.equal(initial["blocks.0.mlp.fc.weight"], rank0["final"]["blocks.0.mlp.fc.weight"])


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_two_and_on_one(two_ranks):
    folder, (rank0, rank1) = two_ranks
    checkpoint = rank0["checkpoint"]
    matrices = len(GPT(load_config(TINY, environ={})[0]).param_groups()["matrix"])
    assert len(checkpoint["optimizers"][0]["state"]) == matrices  # every buffer, gathered from both ranks
    assert 0 < rank0["muon_state_here"] < matrices and rank0["muon_state_here"] + rank1["muon_state_here"] == matrices
    assert_equal_weights(rank0["resumed"], rank0["final"])
    assert_equal_weights(rank1["resumed"], rank0["final"])
    resumed_here, _ = one_rank(EXACT, folder, 2, checkpoint=checkpoint, first=2)
    assert_close_weights(weights(resumed_here), rank0["final"])
    # the gathered buffers are the 1-rank run's, momentum for momentum, in the same layout
    gathered = checkpoint["optimizers"][0]["state"]
    single, _ = one_rank(EXACT, folder, 2)
    for index, entry in single.state_dict()["optimizers"][0]["state"].items():
        assert_close(gathered[index]["momentum_buffer"], entry["momentum_buffer"])


@pytest.mark.slow
def test_bf16_communication_and_the_global_norm_clip(two_ranks, monkeypatch):
    folder, (rank0, rank1) = two_ranks
    assert_equal_weights(rank0["bf16"], rank1["bf16"])
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(float(clip(params, max_norm))))
    single, _ = one_rank(BF16, folder, 3)
    # the 2 ranks clipped by the norm of the averaged gradient over all parameters, not a rank's own
    assert len(norms) == len(rank0["bf16_norms"]) == 3 and min(norms) > 0.05
    np.testing.assert_allclose(rank0["bf16_norms"], norms, rtol=1e-2)
    assert rank0["bf16_norms"] == rank1["bf16_norms"]
    initial = weights(build(BF16, 1, 0, folder))
    expected = weights(single)
    matrices = {name for name, p in single.model.named_parameters() if p.dim() == 2 and name.endswith(".weight")
                and "emb" not in name and "table" not in name}
    moved = {name: (w.float() - initial[name].float()).norm() for name, w in expected.items()}
    drift = {name: (rank0["bf16"][name].float() - w.float()).norm() for name, w in expected.items()}
    for name in matrices:  # the bf16-communicated gradients' matrices, one by one
        assert drift[name] <= BF16_DRIFT * moved[name], (name, float(drift[name]), float(moved[name]))
    total = lambda norms: torch.stack(list(norms.values())).norm()  # noqa: E731
    assert total(drift) <= BF16_DRIFT * total(moved)  # and the whole model


@pytest.mark.slow
def test_a_gradient_on_one_rank_only_is_averaged_with_zeros_on_every_rank(two_ranks):
    expected = {"scalar": torch.full((3,), 3.0), "matrices": [torch.full((4, 4), 2.0), torch.full((4, 4), 2.0)]}
    owners = []
    for out in two_ranks[1]:
        partial = out["partial"]
        assert torch.equal(partial["scalar"], expected["scalar"])  # (6 + 0) / 2 on both ranks: AdamW steps alike
        for owned, grad, want in zip(partial["owned"], partial["matrices"], expected["matrices"]):
            assert torch.equal(grad, want) if owned else grad is None  # (4 + 0) / 2 and (2 + 2) / 2 at the owner
        owners.append(partial["owned"])
    assert [a or b for a, b in zip(*owners)] == [True, True]  # each matrix has its owner


def test_bytes_per_step_count_the_padded_buckets():
    matrices = spec_matrices()
    small = [torch.nn.Parameter(torch.empty(10, device="meta")), torch.nn.Parameter(torch.empty(3, 5, device="meta"))]
    sync = GradientSync(ShardPlan([matrices], world=8, rank=0), small, torch.bfloat16)
    try:
        sent = sync.bytes_per_step(torch.float32)
    finally:
        sync.close()
    padded = sum(8 * bucket.slot * bucket.numel for bucket in sync.plan.buckets)
    assert padded >= sum(p.numel() for p in matrices)  # every matrix has a slot
    assert sent == {"reduce-scatter": 2 * padded, "all-gather": 4 * padded, "all-reduce": 4 * 25}


@pytest.mark.slow
def test_two_ranks_agree_to_stop_one_step_later(two_ranks):
    _, (rank0, rank1) = two_ranks
    # step 2's flag arrives with step 3's post; a pause's own flags at once, its next ones with the next post
    expected = [None, (False,), (False,), (True,), (True,), (True,)]
    assert rank0["agreed"] == rank1["agreed"] == expected


def test_an_export_failing_on_rank_0_ends_every_rank(two_ranks):
    """Rank 0's export stops over the byte budget; rank 1 learns it from rank 0 instead of waiting at a
    barrier rank 0 never reaches (on 8 GPUs: seven hung processes until NCCL's timeout)."""
    _, (rank0, rank1) = two_ranks
    assert rank0["export"].startswith("ValueError: ") and "budget" in rank0["export"], rank0["export"]
    assert rank1["export"] == f"TrainingError: rank 0's export failed: {rank0['export'][len('ValueError: '):]}"
