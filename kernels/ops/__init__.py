"""One module per kernel family (Liger-Kernel's `ops/` layout): `kernels.ops.<family>` is the
module, `kernels.<public name>` the function the model calls, so the two never share a name."""
