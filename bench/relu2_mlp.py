"""The block's relu^2 MLP: fused Triton op vs eager reference vs torch.compile(reference).

    python -m bench.relu2_mlp [--smoke] [--preset NAME] [--negative-slope S] [--name value ...]

One training micro-batch per GPU through one MLP (`shape`, from the config): x [N, d] with N the
micro-batch's tokens, w_up [F, d] and w_down [d, F] with F = mlp_mult x d (SPEC: N = 48 * 2048,
d = 512, F = 1536; FRONTIER.md, `--preset frontier`: N = 48 * 2048, F = 2048), all bf16 (the model
hands the op weights already cast to x's dtype). The activation is leaky_relu(h, S)^2 with S the
config's MLP_LEAKY_SLOPE (SPEC 0.0, relu^2; FRONTIER.md 0.5), or --negative-slope S, this script's own flag.
Times forward alone (no grad) and forward + backward (random upstream
gradient, gradients of x, w_up and w_down), and the peak memory each allocates beyond its inputs.

FLOPs: forward 2 GEMMs of 2NdF each = 4NdF; the backward 4 GEMMs (dh, dW_down, dx, dW_up) = 8NdF,
so forward + backward is 12NdF, three times the forward. Every variant executes the same GEMMs;
what differs is the [N, F] pointwise traffic around them (N * F * 2 bytes, 302 MB per tensor in SPEC),
which the Triton op folds into the GEMMs' prologues and epilogues.
"""
import functools
import sys

import torch

from bench.common import Bench, micro_batch, table, variant_rows

SLOPE_FLAG = "--negative-slope"


def shape(cfg) -> dict:
    """N tokens of one micro-batch, D model dim, HIDDEN the MLP's width."""
    B, T = micro_batch(cfg)
    return dict(N=B * T, D=cfg.model_dim, HIDDEN=cfg.mlp_hidden)


def flops(n: int, d: int, hidden: int, backward: bool) -> int:
    """Matmul FLOPs: forward 2 * 2ndF, forward + backward 3x that."""
    forward = 2 * 2 * n * d * hidden
    return 3 * forward if backward else forward


def hidden_bytes(n: int, hidden: int, element_size: int = 2) -> int:
    """One [N, F] activation tensor (h, a, da or dh)."""
    return n * hidden * element_size


def split_slope_flag(argv) -> tuple[float | None, list]:
    """(the slope --negative-slope S gives, or None; the other arguments, for bench.common)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if SLOPE_FLAG not in argv:
        return None, argv
    i = argv.index(SLOPE_FLAG)
    try:
        slope = float(argv[i + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"python -m bench.relu2_mlp: {SLOPE_FLAG} takes a number (0.5 for FRONTIER.md's MLP)") from None
    return slope, argv[:i] + argv[i + 2:]


def make_inputs(n: int, d: int, hidden: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=gen, device=device).bfloat16()
    w_up = (torch.randn(hidden, d, generator=gen, device=device) / d**0.5).bfloat16()  # h ~ N(0, 1), half of it < 0
    w_down = (torch.randn(d, hidden, generator=gen, device=device) / hidden**0.5).bfloat16()
    dy = torch.randn(n, d, generator=gen, device=device).bfloat16()
    return x, w_up, w_down, dy


def main(argv=None) -> None:
    slope, argv = split_slope_flag(argv)
    bench = Bench("bench.relu2_mlp", argv)
    N, D, HIDDEN = shape(bench.cfg).values()
    slope = float(bench.cfg.mlp_leaky_slope) if slope is None else slope  # SPEC 0.0, --preset frontier 0.5
    from kernels import reference
    from kernels.ops import relu2_mlp

    x, w_up, w_down, dy = make_inputs(N, D, HIDDEN, bench.device)
    reference_mlp = functools.partial(reference.relu2_mlp, negative_slope=slope)
    variants = {
        "triton": functools.partial(relu2_mlp.relu2_mlp, negative_slope=slope),
        "eager reference": reference_mlp,
        "compiled reference": bench.compiled(reference_mlp),
    }
    leaves = [t.detach().requires_grad_() for t in (x, w_up, w_down)]

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(x, w_up, w_down)
        return run

    def forward_backward(fn):
        def run():
            return torch.autograd.grad(fn(*leaves), leaves, dy)
        return run

    rows = []
    for pass_name, make_run, backward in (("forward", forward, False), ("forward+backward", forward_backward, True)):
        rows += variant_rows(pass_name, bench.time_variants(variants, make_run), flops=flops(N, D, HIDDEN, backward))

    activation = "relu^2" if slope == 0.0 else f"LeakyReLU({slope})^2"
    print(bench.header(f"{activation} MLP, N={N}, d={D}, F={HIDDEN}, bf16"))
    print(
        f"FLOPs: forward 2 * 2NdF = {flops(N, D, HIDDEN, False):.3e}, forward+backward 3 * 4NdF = "
        f"{flops(N, D, HIDDEN, True):.3e}. One [N, F] bf16 activation is {hidden_bytes(N, HIDDEN) / 1e6:.0f} MB; "
        f"the Triton op never stores a = {activation} of h, or da.\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
