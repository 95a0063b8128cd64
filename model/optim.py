"""The three optimizer groups (SPEC.md "Training recipe"; FRONTIER.md section 3's table): Muon for
the matrices, AdamW for the embedding tables, AdamW for the scalars and control tensors. Every
param group keeps its `base_lr` so the schedule only multiplies.

The frontier's settings arrive through Config: Muon's Polar-Express coefficients
(MUON_POLAR_EXPRESS) and row normalisation (MUON_ROW_NORMALIZE), and the embedding group's own
weight decay (EMBED_WD; negative = ADAM_WD, SPEC's single AdamW decay)."""
import torch

from kernels.reference import POLAR_EXPRESS_COEFFS, QUINTIC_COEFFS
from model.config import Config
from model.muon import Muon


def muon_coeffs(cfg: Config):
    """Newton-Schulz coefficients: SPEC's quintic triple for every step, or the five Polar-Express
    triples (one per step, so MUON_BACKEND_STEPS must be 5)."""
    if not cfg.muon_polar_express:
        return QUINTIC_COEFFS
    if cfg.muon_backend_steps != len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"MUON_POLAR_EXPRESS=1 has {len(POLAR_EXPRESS_COEFFS)} coefficient triples, one per step, "
                         f"but MUON_BACKEND_STEPS={cfg.muon_backend_steps}; set MUON_BACKEND_STEPS={len(POLAR_EXPRESS_COEFFS)}")
    return POLAR_EXPRESS_COEFFS


def embed_weight_decay(cfg: Config) -> float:
    return cfg.adam_wd if cfg.embed_wd < 0 else cfg.embed_wd


def build_optimizers(model, cfg: Config, muon_compute_dtype: torch.dtype = torch.bfloat16) -> list[torch.optim.Optimizer]:
    """muon_compute_dtype: the Newton-Schulz precision (model.training.muon_compute_dtype decides it)."""
    groups = model.param_groups()
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **fused)
    optimizers = [
        Muon(
            groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
            coeffs=muon_coeffs(cfg), weight_decay=cfg.muon_wd, compute_dtype=muon_compute_dtype,
            row_normalize=cfg.muon_row_normalize,
        ),
        torch.optim.AdamW(groups["embed"], lr=cfg.tied_embed_lr, weight_decay=embed_weight_decay(cfg), **adam),
        torch.optim.AdamW(groups["scalar"], lr=cfg.scalar_lr, weight_decay=cfg.adam_wd, **adam),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def set_schedule(optimizers, lr_scale: float, muon_momentum: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum
