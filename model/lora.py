"""Per-document LoRA adapters for the phased TTT (FRONTIER.md section 5, "Per-document LoRA").

A batch of n documents runs through the model together; every document b has its own adapters,
one slot per block APPLICATION of the trunk (17 when looped: a repeated block gets a slot per
repeat), on

    q    Q projection   d -> d       input u (the normed attention input), added before the q RMSNorm
    k    K projection   d -> kv_dim  (TTT_K_LORA)
    v    V projection   d -> kv_dim
    o    attention out  d -> d       input u (not the attention output), added to W_o's output before
                                     the attention scale (TTT_O_LORA)
    mlp  MLP            d -> d       input the normed MLP input, added to the MLP output before the
                                     MLP scale (TTT_MLP_LORA)

and one on the head (d -> vocab, input the final-normed h, added to the logits before the softcap;
kernels.softcap_cross_entropy_lora applies it without the batch's logits).

    delta_b(x) = (x A_b^T) B_b^T (alpha / r),   A_b [r, in] ~ U(+-1/sqrt(in)),  B_b [out, r] = 0

so a fresh adapter changes nothing. The products are batched matmuls over the documents
(torch.bmm: each document its own A and B); the parameters are fp32, cast to the input's dtype.

The model's hook: `model.hidden(ids, lora=view)`, view = adapters.running(first) (the documents
first.. of the batch, one per row of ids), hands application n `view.at(n)`, an ApplicationLora
whose q/k/v/o/mlp(x) return the delta [n, T, out] or None (that adapter off).
"""
import math

import torch
from torch import nn

KINDS = ("q", "k", "v", "o", "mlp")


def lora_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each enabled per-application adapter."""
    d = cfg.model_dim
    shapes = {"q": (d, d), "k": (d, cfg.kv_dim), "v": (d, cfg.kv_dim), "o": (d, d), "mlp": (d, d)}
    enabled = {"k": cfg.ttt_k_lora, "o": cfg.ttt_o_lora, "mlp": cfg.ttt_mlp_lora}
    return {kind: shape for kind, shape in shapes.items() if enabled.get(kind, True)}


class BatchedLora(nn.Module):
    """The adapters of `docs` documents on `applications` block applications and the head.

    Parameters (fp32): `{kind}_a` [applications, docs, r, in], `{kind}_b` [applications, docs, out, r],
    `head_a` [docs, r, d], `head_b` [docs, vocab, r].
    """

    def __init__(self, cfg, applications: int, docs: int, device=None):
        super().__init__()
        self.rank, self.scale = cfg.ttt_lora_rank, cfg.ttt_lora_alpha / cfg.ttt_lora_rank
        self.applications, self.docs = applications, docs
        self.shapes = lora_shapes(cfg)
        r = self.rank
        for kind, (fan_in, fan_out) in self.shapes.items():
            self.register_parameter(f"{kind}_a", nn.Parameter(torch.zeros(applications, docs, r, fan_in, device=device)))
            self.register_parameter(f"{kind}_b", nn.Parameter(torch.zeros(applications, docs, fan_out, r, device=device)))
        self.head_a = nn.Parameter(torch.zeros(docs, r, cfg.model_dim, device=device))
        self.head_b = nn.Parameter(torch.zeros(docs, cfg.vocab_size, r, device=device))

    def a_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.endswith("_a")]

    def b_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.endswith("_b")]

    @torch.no_grad()
    def reset_a(self, generator: torch.Generator) -> None:
        """A ~ U(+-1/sqrt(in)) from `generator` (seeded by the caller: the same draws on any rank)."""
        for a in self.a_parameters():
            bound = 1.0 / math.sqrt(a.shape[-1])
            a.copy_(torch.rand(a.shape, generator=generator, device=a.device) * (2 * bound) - bound)

    @torch.no_grad()
    def reset_b(self) -> None:
        for b in self.b_parameters():
            b.zero_()

    def running(self, first: int = 0) -> "AdapterView":
        """The adapters of documents first.. (the batch's shorter documents have dropped out; rows are
        sorted by length, so the running ones are a suffix): what the model's forward reads."""
        tensors = {kind: (getattr(self, f"{kind}_a")[:, first:], getattr(self, f"{kind}_b")[:, first:]) for kind in self.shapes}
        return AdapterView(tensors, (self.head_a[first:], self.head_b[first:]), self.scale, self.applications)


class AdapterView:
    """Views of a BatchedLora's running documents (autograd reaches the parameters through them).
    A plain object of tensors, so a compiled forward takes them as inputs (no guard on which rows)."""

    def __init__(self, tensors: dict, head: tuple, scale: float, applications: int):
        self.tensors, self.head, self.scale, self.applications = tensors, head, scale, applications

    def at(self, application: int) -> "ApplicationLora":
        if not 0 <= application < self.applications:
            raise IndexError(f"the adapters have {self.applications} application slots, asked for {application}; "
                             "build them with the looped model's number of block applications (len(model.plan()))")
        return ApplicationLora(self, application)

    def delta(self, application: int, kind: str, x: torch.Tensor) -> torch.Tensor | None:
        """(x A^T) B^T (alpha / r) per document: x [n, T, in] -> [n, T, out]; None if that adapter is off."""
        if kind not in self.tensors:
            return None
        a, b = (t[application].to(x.dtype) for t in self.tensors[kind])  # [n, r, in], [n, out, r]
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)) * self.scale, b.transpose(1, 2))


class ApplicationLora:
    """The adapters of one block application, as the model's layers call them."""

    def __init__(self, view: AdapterView, application: int):
        self.view, self.application = view, application

    def q(self, x):
        return self.view.delta(self.application, "q", x)

    def k(self, x):
        return self.view.delta(self.application, "k", x)

    def v(self, x):
        return self.view.delta(self.application, "v", x)

    def o(self, x):
        return self.view.delta(self.application, "o", x)

    def mlp(self, x):
        return self.view.delta(self.application, "mlp", x)


def add_delta(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """y + delta, reshaped to y's shape; y unchanged when the adapter is off."""
    return y if delta is None else y + delta.view_as(y)
