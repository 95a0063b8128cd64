"""SPEC's three optimizer groups: Muon for the matrices, AdamW for the embedding tables, AdamW
for the scalars and control tensors. Every param group keeps its `base_lr` so the schedule
only multiplies."""
import torch

from model.config import Config
from model.muon import Muon


def build_optimizers(model, cfg: Config, muon_compute_dtype: torch.dtype = torch.bfloat16) -> list[torch.optim.Optimizer]:
    """muon_compute_dtype: the Newton-Schulz precision (model.training.muon_compute_dtype decides it)."""
    groups = model.param_groups()
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.adam_wd, **fused)
    optimizers = [
        Muon(
            groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
            backend_steps=cfg.muon_backend_steps, weight_decay=cfg.muon_wd, compute_dtype=muon_compute_dtype,
        ),
        torch.optim.AdamW(groups["embed"], lr=cfg.tied_embed_lr, **adam),
        torch.optim.AdamW(groups["scalar"], lr=cfg.scalar_lr, **adam),
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
