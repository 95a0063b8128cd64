"""Tight SWA: a running sum of weight snapshots taken late in the warmdown; their mean replaces
the weights at the end of training."""
import torch


class WeightAverage:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> None:
        """Add the current floating-point parameters and buffers (summed in fp32)."""
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if name in self.sums:
                self.sums[name] += value.float()
            else:
                self.sums[name] = value.detach().float().clone()
        self.count += 1

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> bool:
        """Replace the model's weights by the average; False (weights untouched) when empty."""
        if self.count == 0:
            return False
        state = model.state_dict()
        for name, total in self.sums.items():
            state[name].copy_((total / self.count).to(state[name].dtype))
        return True

    def state_dict(self) -> dict:
        return {"sums": self.sums, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])
