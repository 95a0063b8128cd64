"""One tolerance table for every kernel test, by dtype; stated here, not tuned per test."""
import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, **override):
    """Compare with the tolerance of `dtype` (default: expected's dtype)."""
    tol = dict(TOLERANCES[dtype or expected.dtype], **override)
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


def assert_within_pytorch_error(actual, exact, pytorch_same_dtype, factor: float = 2.0, atol: float = 1e-5):
    """flash-attention's fair bound: the kernel's error against an exact (fp32/fp64) answer is at
    most `factor` times PyTorch's own error computing the same thing in the kernel's dtype."""
    exact = exact.double()
    kernel_err = (actual.double() - exact).abs().max().item()
    torch_err = (pytorch_same_dtype.double() - exact).abs().max().item()
    assert kernel_err <= factor * torch_err + atol, (
        f"kernel error {kernel_err:.3e} exceeds {factor} x PyTorch's same-dtype error {torch_err:.3e} + {atol}"
    )
