"""GPTQ for the frontier artifact (FRONTIER.md section 4): calibration Hessians and the quantiser.

Calibration: `collect_hessians(model, batches)` runs the model (eval mode, no gradients, causal
over whole rows: no cu_seqlens) and accumulates H = sum XᵀX in fp32 over the input X of every
quantised matrix, through forward hooks: a looped layer's hook fires once per use, so layers the
depth recurrence repeats accumulate once per application. The tied embedding's Hessian is built
from the final-normed hidden state (the input of the head, which multiplies by tok_emb). An MLP
whose kernel never calls its fc/proj modules (the fused relu^2 op) is caught by a hook on the MLP
itself, which recomputes fc's output and the activation. H is divided by the number of batches.
The caller may run the forward under bf16 autocast (the export does: model/calibration.py); the
hooks see its bf16 activations but turn autocast off for their own products, so every XᵀX, every
sum and the MLP hook's fc output and activation are fp32.

Quantiser: `gptq_quantize(W, H, bits, sigma)`, batched over a leading layer dimension:
1. dead columns (diag H = 0) get H_dd = 1 and a zero weight column; then H += 0.01 mean(diag H) I;
2. act-order: columns sorted by diag H, descending;
3. U = upper Cholesky factor of H^-1;
4. per-row scale s = fp16(max(sigma * std_row(W) / R, 1e-10)), std unbiased, of the ORIGINAL W,
   R = 2^(bits-1) - 1; no scale search;
5. columns in blocks of 128, q = clamp(round_half_even(w / s), -R, R), error e = (w - q s) / U_jj fed
   to the rest of the block through U's row, and to the later columns after each block; the
   permutation undone.
A scale that fp16 flushes to zero (a row whose sigma * std / R is below fp16's smallest subnormal,
an all-zero row for one) stores q = 0 instead of dividing by zero.
"""
import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_COLUMNS = 128
DAMPING = 0.01
SCALE_FLOOR = 1e-10
EMBED_NAME = "tok_emb.weight"


# --------------------------------------------------------------------------- calibration


def _without_autocast(x: torch.Tensor):
    """Autocast off on x's device: the hooks' own products stay fp32 inside the caller's bf16 autocast."""
    return torch.autocast(x.device.type, enabled=False)


class _Accumulator:
    """Sums XᵀX per name; consecutive hooks handed the same tensor (c_q, c_k, c_v share u) reuse one product."""

    def __init__(self):
        self.hessians: dict[str, torch.Tensor] = {}
        self._last_input, self._last_product = None, None

    def add(self, name: str, x: torch.Tensor) -> None:
        if x is not self._last_input:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            with _without_autocast(flat):  # else the enclosing bf16 autocast makes the product bf16
                self._last_input, self._last_product = x, flat.T @ flat  # [cols, cols] fp32
        if name in self.hessians:
            self.hessians[name] += self._last_product
        else:
            self.hessians[name] = self._last_product.clone()

    def forget(self) -> None:
        self._last_input, self._last_product = None, None


def _mlp_activation(model: nn.Module, mlp: nn.Module):
    """The MLP's activation: leaky_relu(z, slope)^2 with the MLP's negative_slope, else the config's (0 = relu^2)."""
    slope = float(getattr(mlp, "negative_slope", getattr(getattr(model, "cfg", None), "mlp_leaky_slope", 0.0)))
    return lambda z: F.leaky_relu(z, slope).square()


def collect_hessians(model: nn.Module, batches, names) -> tuple[dict[str, torch.Tensor], float]:
    """{weight name: H [cols, cols] fp32} for every name in `names`, and the seconds it took.

    batches: an iterable of token ids [B, T] (or (ids, targets) pairs; targets are ignored), on the
    model's device. names: state-dict names of the matrices to quantise (`*.weight` of a linear
    module, or tok_emb.weight). The model runs in eval mode under no_grad and is put back in its
    previous mode; the caller sets autocast and the loop flag as the export's forward should have.
    """
    t0 = time.perf_counter()
    names = set(names)
    modules = dict(model.named_modules())
    acc, fused = _Accumulator(), _Accumulator()  # fused: the MLP hooks, used when fc/proj never ran
    handles = []

    def linear_hook(name):
        return lambda module, args, output: acc.add(name, args[0])

    def mlp_hook(prefix, mlp):
        activation = _mlp_activation(model, mlp)

        def hook(module, args):
            x = args[0]
            fused.add(f"{prefix}.fc.weight", x)
            with _without_autocast(x):  # phi(z) in fp32 from the bf16 input, as the fp32 H wants
                z = F.linear(x.float(), mlp.fc.weight.float())
                fused.add(f"{prefix}.proj.weight", activation(z))
        return hook

    for name in names - {EMBED_NAME}:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise ValueError(f"collect_hessians: {name} is not the weight of a linear module of this model; "
                             f"pass the names of the matrices GPTQ quantises")
        handles.append(module.register_forward_hook(linear_hook(name)))
    for prefix, module in modules.items():
        if all(isinstance(getattr(module, part, None), nn.Linear) for part in ("fc", "proj")) and \
                {f"{prefix}.fc.weight", f"{prefix}.proj.weight"} & names:
            handles.append(module.register_forward_pre_hook(mlp_hook(prefix, module)))

    was_training, count = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch[0] if isinstance(batch, (tuple, list)) else batch
                h = model.hidden(ids)  # [B, T, dim], final-normed: the head's input
                if EMBED_NAME in names:
                    acc.add(EMBED_NAME, h)
                acc.forget()
                fused.forget()
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("collect_hessians: no calibration batches; pass GPTQ_CALIBRATION_BATCHES >= 1 batches of ids")
    hessians = {}
    for name in names:
        H = acc.hessians.get(name, fused.hessians.get(name))
        if H is None:
            raise ValueError(f"collect_hessians: {name} never saw an input in the forward; "
                             f"its module is not on the path of model.hidden(ids)")
        hessians[name] = H / count
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return hessians, time.perf_counter() - t0


# --------------------------------------------------------------------------- quantiser


def sigma_rule_scale(W: torch.Tensor, bits: int, sigma: float) -> torch.Tensor:
    """fp16 per-row scale max(sigma * std_row(W) / R, 1e-10) of W [..., rows, cols] -> [..., rows]."""
    R = 2 ** (bits - 1) - 1
    std = W.float().std(dim=-1)  # unbiased
    return torch.clamp(sigma * std / R, min=SCALE_FLOOR).to(torch.float16)


def _round_column(w: torch.Tensor, s: torch.Tensor, R: int) -> torch.Tensor:
    """clamp(round_half_even(w / s), -R, R) with q = 0 where s is 0 (fp16 underflow)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, torch.clamp(torch.round(w / safe), -R, R), torch.zeros_like(w))


def round_to_nearest(W: torch.Tensor, bits: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rounding with the sigma-rule scale: (q int8, scale fp16); GPTQ with H = I equals it."""
    scale = sigma_rule_scale(W, bits, sigma)
    q = _round_column(W.float(), scale.float()[..., None], 2 ** (bits - 1) - 1)
    return q.to(torch.int8), scale


@contextlib.contextmanager
def single_threaded_on_cpu(device):
    """One intra-op thread while a loop of many tiny CPU ops runs (GPTQ's columns, the L1 chain's
    steps): their tensors are too small to share, and on a busy machine each op's thread barrier
    waits on a descheduled thread (measured here: 40x slower with 2 threads under load)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, sigma: float,
                  block: int = BLOCK_COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of W [rows, cols] or [L, rows, cols] with H [cols, cols] or [L, cols, cols] -> (q int8, scale fp16).

    Runs on W's device, in fp32; the batch dimension L quantises layers of one shape together.
    """
    single = W.dim() == 2
    if single:
        W, H = W[None], H[None]
    if W.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"gptq_quantize: W {tuple(W.shape)} and H {tuple(H.shape)} do not fit: "
                         f"H must be [cols, cols] per matrix")
    R = 2 ** (bits - 1) - 1
    L, rows, cols = W.shape
    scale = sigma_rule_scale(W, bits, sigma)  # from the original W
    s = scale.float()[:, :, None]  # [L, rows, 1]
    W = W.float().clone()
    H = H.to(W.device, torch.float32).clone()

    diag = torch.diagonal(H, dim1=1, dim2=2)  # a view: edits reach H
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    diag += DAMPING * diag.mean(dim=1, keepdim=True)

    order = torch.argsort(diag, dim=1, descending=True, stable=True)  # act-order, [L, cols]
    W = torch.gather(W, 2, order[:, None, :].expand(L, rows, cols))
    H = torch.gather(torch.gather(H, 1, order[:, :, None].expand(L, cols, cols)), 2, order[:, None, :].expand(L, cols, cols))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [L, cols, cols]

    Q = torch.zeros_like(W)
    with single_threaded_on_cpu(W.device):
        _quantize_columns(W, U, Q, s, R, block)
    inverse = torch.argsort(order, dim=1)
    Q = torch.gather(Q, 2, inverse[:, None, :].expand(L, rows, cols)).to(torch.int8)
    return (Q[0], scale[0]) if single else (Q, scale)


def _quantize_columns(W: torch.Tensor, U: torch.Tensor, Q: torch.Tensor, s: torch.Tensor, R: int, block: int) -> None:
    """Step 5 in place: W [L, rows, cols] (act-ordered, updated with the error), Q its codes."""
    cols = W.shape[2]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            w = W1[:, :, j : j + 1]  # [L, rows, 1]
            q = _round_column(w, s, R)
            Q[:, :, i1 + j : i1 + j + 1] = q
            e = (w - q * s) / U1[:, j, j][:, None, None]
            W1[:, :, j:] -= e * U1[:, j : j + 1, j:]
            E1[:, :, j : j + 1] = e
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]


def quadratic_error(W: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ), ΔW = W - q s: the layer-output error GPTQ minimises (for tests and reports)."""
    delta = W.double() - q.double() * scale.double()[:, None]
    return float(torch.einsum("rc,cd,rd->", delta, H.double(), delta))
