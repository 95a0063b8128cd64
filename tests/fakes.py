"""Stand-ins the training and model tests share."""
import math

import torch


class CountingBatches:
    """A loader (train.py's interface) whose random batches follow its position, so restoring its
    state is visible and a test can peek at the batches a step is about to read."""

    def __init__(self, vocab: int):
        self.vocab, self.position = vocab, 0

    def next_batch(self, tokens: int, seq_len: int, device):
        g = torch.Generator().manual_seed(self.position)
        self.position += 1
        seq = torch.randint(0, self.vocab, (tokens // seq_len, seq_len + 1), generator=g)
        return seq[:, :-1].to(device), seq[:, 1:].to(device)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@torch.no_grad()
def randomise(model, seed: int = 1):
    """Random values everywhere, so that zero-initialised paths (out projections, gates, lambdas,
    the bigram table) matter: linear weights ~ N(0, 1/fan_in), tables ~ N(0, 0.25), every other
    tensor (control tensors) around its init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 2 and name.endswith(".weight") and "tok_emb" not in name:
            p.copy_(noise / math.sqrt(p.shape[1]))
        elif name.endswith("table") or "tok_emb" in name:
            p.copy_(noise * 0.5)
        else:
            p.copy_(p.float() + 0.3 * noise)
    return model
