"""Stand-ins the training tests share."""
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
