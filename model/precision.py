"""The run's compute precision in one place (SPEC "precision"): bf16 autocast on the GPU, for
training and evaluation alike; plain fp32 on the CPU."""
import contextlib

import torch


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
