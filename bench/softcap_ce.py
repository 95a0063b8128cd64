"""Soft-capped cross-entropy over the tied head: Triton vs eager reference vs torch.compile(reference);
then the same with the phased TTT's per-document LoRA head (`lora_shape`).

    python -m bench.softcap_ce [--smoke] [--preset NAME] [--name value ...]

One training micro-batch per GPU through the tied head (`shape`, from the config): N tokens of the
micro-batch, V = vocab, d = model dim, the model's soft cap (SPEC: N = 48 * 2048, V = 1024,
d = 512, cap 30), bf16 x and weight.
Times forward alone (no grad) and forward + backward (per-token random upstream gradient), and
the peak memory each allocates beyond its inputs.

FLOPs: the useful work is 2NVd forward and 4NVd backward (grad_x and grad_weight products); the
Triton backward also recomputes the logits (+2NVd), so it executes 8NVd for forward + backward.
TFLOP/s below count the useful work (the same numerator for every variant, so they compare).
"""
import torch

from bench.common import Bench, micro_batch, table, variant_rows


def shape(cfg) -> dict:
    """N tokens of one micro-batch, V vocab, D model dim: x [N, D] against the tied head [V, D]."""
    B, T = micro_batch(cfg)
    return dict(N=B * T, V=cfg.vocab_size, D=cfg.model_dim)


def useful_flops(n: int, v: int, d: int, backward: bool) -> int:
    """Matmul FLOPs of the op itself: forward 2nvd, backward 4nvd."""
    return (6 if backward else 2) * n * v * d


def executed_flops_triton(n: int, v: int, d: int, backward: bool) -> int:
    """What the Triton path runs: the backward recomputes the forward product."""
    return (8 if backward else 2) * n * v * d


def fp32_logits_bytes(n: int, v: int) -> int:
    """The [N, V] fp32 logits the fused kernel never materialises."""
    return 4 * n * v


def lora_shape(cfg) -> dict:
    """The phased TTT's head (FRONTIER.md section 5): TTT_BATCH_SIZE documents of TTT_EVAL_SEQ_LEN rows
    (the longest windows), rank TTT_LORA_RANK adapters on the logits."""
    return dict(B=cfg.ttt_batch_size, T=cfg.ttt_eval_seq_len, V=cfg.vocab_size, D=cfg.model_dim, R=cfg.ttt_lora_rank)


def lora_useful_flops(b: int, t: int, v: int, d: int, r: int) -> int:
    """Forward + backward of the head with its LoRA, weight frozen: forward 2NV(d + r) + 2Ndr, backward
    grad_x 2NVd, grad_u and grad_B 4NVr, grad_x and grad_A through u 4Ndr."""
    n = b * t
    return 2 * n * v * (d + r) + 2 * n * d * r + 2 * n * v * d + 4 * n * v * r + 4 * n * d * r


def make_inputs(n: int, v: int, d: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, d, generator=gen, device=device) * 8 / d**0.5).bfloat16()  # raw logits of std ~ 8
    weight = torch.randn(v, d, generator=gen, device=device).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    grad_loss = torch.randn(n, generator=gen, device=device)
    return x, weight, targets, grad_loss


def main(argv=None) -> None:
    bench = Bench("bench.softcap_ce", argv)
    N, V, D = shape(bench.cfg).values()
    softcap = bench.cfg.logit_softcap
    from kernels import reference
    from kernels.ops import softcap_ce

    x, weight, targets, grad_loss = make_inputs(N, V, D, bench.device)
    # Every variant takes (x, weight, targets); the soft cap is a constant of the model.
    variants = {
        "triton": lambda x, w, t: softcap_ce.softcap_cross_entropy(x, w, t, softcap),
        "eager reference": lambda x, w, t: reference.softcap_cross_entropy(x, w, t, softcap),
        "compiled reference": bench.compiled(lambda x, w, t: reference.softcap_cross_entropy(x, w, t, softcap)),
    }
    x_grad, weight_grad = x.detach().requires_grad_(), weight.detach().requires_grad_()

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(x, weight, targets)
        return run

    def forward_backward(fn):
        def run():
            loss = fn(x_grad, weight_grad, targets)
            return torch.autograd.grad(loss, (x_grad, weight_grad), grad_loss)
        return run

    rows = []
    for pass_name, make_run, backward in (("forward", forward, False), ("forward+backward", forward_backward, True)):
        timed = bench.time_variants(variants, make_run)
        rows += variant_rows(pass_name, timed, flops=useful_flops(N, V, D, backward), column="useful TFLOP/s")

    print(bench.header(f"softcap cross-entropy, N={N}, V={V}, d={D}, bf16, softcap {softcap}"))
    print(
        f"useful FLOPs: forward 2NVd = {useful_flops(N, V, D, False):.3e}, forward+backward 6NVd = "
        f"{useful_flops(N, V, D, True):.3e}; the Triton backward recomputes the logits, so it executes "
        f"8NVd = {executed_flops_triton(N, V, D, True):.3e}. fp32 logits it never stores: "
        f"{fp32_logits_bytes(N, V) / 2**20:.0f} MiB.\n"
    )
    print(table(rows))
    lora_rows(bench)


def lora_rows(bench) -> None:
    """The phased TTT's per-token CE with the per-document LoRA head: forward + backward to x, A and B
    (the model's weight frozen, as in the TTT)."""
    B, T, V, D, R = lora_shape(bench.cfg).values()
    if bench.smoke:  # the interpreter: 3 documents of 37 rows, rank 8 (ragged against every block)
        B, T, R = 3, 37, 8
    softcap = bench.cfg.logit_softcap
    from kernels import reference
    from kernels.ops import softcap_ce

    gen = torch.Generator(device=bench.device).manual_seed(1)
    x = (torch.randn(B, T, D, generator=gen, device=bench.device) * 8 / D**0.5).bfloat16().requires_grad_()
    weight = torch.randn(V, D, generator=gen, device=bench.device).bfloat16()
    targets = torch.randint(0, V, (B, T), generator=gen, device=bench.device)
    lora_a = (torch.rand(B, R, D, generator=gen, device=bench.device) * 2 - 1).div(D**0.5).requires_grad_()
    lora_b = (torch.randn(B, V, R, generator=gen, device=bench.device) * 0.01).requires_grad_()
    scale = bench.cfg.ttt_lora_alpha / R
    variants = {
        "triton": softcap_ce.softcap_cross_entropy_lora,
        "eager reference": reference.softcap_cross_entropy_lora,
        "compiled reference": bench.compiled(reference.softcap_cross_entropy_lora),
    }

    def forward_backward(fn):
        def run():
            loss = fn(x, weight, targets, lora_a, lora_b, scale, softcap)
            return torch.autograd.grad(loss.sum(), (x, lora_a, lora_b))
        return run

    timed = bench.time_variants(variants, forward_backward)
    flops = lora_useful_flops(B, T, V, D, R)
    print(f"\n### with the phased TTT's LoRA head: {B} documents x {T} rows, V={V}, d={D}, r={R}, bf16\n")
    print(f"useful FLOPs forward+backward (weight frozen) = {flops:.3e}; fp32 logits the kernel never stores: "
          f"{fp32_logits_bytes(B * T, V) / 2**20:.0f} MiB.\n")
    print(table(variant_rows("forward+backward", timed, flops=flops, column="useful TFLOP/s")))


if __name__ == "__main__":
    main()
