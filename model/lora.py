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

The model's hook: `model.hidden(ids, lora=view)`, view = adapters.running(first).gathered() (the
documents first.. of the batch, one per row of ids), hands application n `view.at(n)`, an
ApplicationLora whose q/k/v/o/mlp(x) return the delta [n, T, out] or None (that adapter off).

Compiled (dynamic shapes), the graphs the warm-up compiles must serve every step of the
evaluation, so what a step hands the compiled function looks alike whichever documents still run:
running(first) holds whole-parameter aliases and the running rows as an index tensor; gathered(),
called INSIDE the compiled function, selects them (a gather the compiler may fuse with the cast to
the compute dtype; its backward scatters into the parameters' gradients). No view with a varying
offset or stride reaches the graph's guards, and the row count is a plain dynamic size (one row
gets a graph of its own: dynamo specialises sizes 0 and 1). A batch holds at least two slots
(MIN_SLOTS), so the slot dimension is never 1.
"""
import math

import torch
from torch import nn

KINDS = ("q", "k", "v", "o", "mlp")
MIN_SLOTS = 2  # a batch of one document still has two slots (the second never runs)


def lora_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each enabled per-application adapter."""
    d = cfg.model_dim
    shapes = {"q": (d, d), "k": (d, cfg.kv_dim), "v": (d, cfg.kv_dim), "o": (d, d), "mlp": (d, d)}
    enabled = {"k": cfg.ttt_k_lora, "o": cfg.ttt_o_lora, "mlp": cfg.ttt_mlp_lora}
    return {kind: shape for kind, shape in shapes.items() if enabled.get(kind, True)}


class BatchedLora(nn.Module):
    """The adapters of `docs` documents on `applications` block applications and the head.

    Parameters (fp32), slots = max(docs, MIN_SLOTS): `{kind}_a` [applications, slots, r, in],
    `{kind}_b` [applications, slots, out, r], `head_a` [slots, r, d], `head_b` [slots, vocab, r];
    document b is slot b (a spare slot of a one-document batch is never read).
    """

    def __init__(self, cfg, applications: int, docs: int, device=None):
        super().__init__()
        self.rank, self.scale = cfg.ttt_lora_rank, cfg.ttt_lora_alpha / cfg.ttt_lora_rank
        self.applications, self.docs = applications, docs
        self.shapes = lora_shapes(cfg)
        r, slots = self.rank, max(docs, MIN_SLOTS)
        for kind, (fan_in, fan_out) in self.shapes.items():
            self.register_parameter(f"{kind}_a", nn.Parameter(torch.zeros(applications, slots, r, fan_in, device=device)))
            self.register_parameter(f"{kind}_b", nn.Parameter(torch.zeros(applications, slots, fan_out, r, device=device)))
        self.head_a = nn.Parameter(torch.zeros(slots, r, cfg.model_dim, device=device))
        self.head_b = nn.Parameter(torch.zeros(slots, cfg.vocab_size, r, device=device))

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
        sorted by length, so the running ones are a suffix): what the model's forward reads, after
        gathered(). The tensors are whole-parameter aliases (view_as: not nn.Parameters, whose
        shapes dynamo would make static) and the rows an index, so every step looks alike to a
        compiled function."""
        if not 0 <= first < self.docs:
            raise IndexError(f"running({first}): the batch has documents 0..{self.docs - 1}")
        alias = lambda name: getattr(self, name).view_as(getattr(self, name))  # noqa: E731
        tensors = {kind: (alias(f"{kind}_a"), alias(f"{kind}_b")) for kind in self.shapes}
        rows = torch.arange(first, self.docs, device=self.head_a.device)
        return AdapterView(tensors, (alias("head_a"), alias("head_b")), self.scale, self.applications, rows)


class AdapterView:
    """A BatchedLora's adapters as a compiled forward takes them: a plain object of tensors (autograd
    reaches the parameters through them) and, until gathered(), the index of the running rows."""

    def __init__(self, tensors: dict, head: tuple, scale: float, applications: int, rows: torch.Tensor | None = None):
        self.tensors, self.head, self.scale, self.applications, self.rows = tensors, head, scale, applications, rows

    def gathered(self) -> "AdapterView":
        """The running rows' adapters, contiguous, one per row of the model's input (call it inside
        the compiled step: the gather is then part of the graph)."""
        if self.rows is None:
            return self
        rows = self.rows
        tensors = {kind: (a.index_select(1, rows), b.index_select(1, rows)) for kind, (a, b) in self.tensors.items()}
        head = tuple(t.index_select(0, rows) for t in self.head)
        return AdapterView(tensors, head, self.scale, self.applications)

    def at(self, application: int) -> "ApplicationLora":
        if not 0 <= application < self.applications:
            raise IndexError(f"the adapters have {self.applications} application slots, asked for {application}; "
                             "build them with the looped model's number of block applications (len(model.plan()))")
        if self.rows is not None:
            raise ValueError("the model reads gathered() adapters: call view.gathered() first (inside the compiled step)")
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
