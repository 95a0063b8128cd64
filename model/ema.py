"""The exponential moving average of the weights (FRONTIER.md section 3, "EMA").

An fp32 copy of every parameter, taken when the run's weights are final after the warm-up, moved
after every optimizer step by e <- d e + (1 - d) p (EMA_DECAY d = 0.9965 in the record). At the end
its weights, cast to each parameter's dtype, replace the model's: evaluation, GPTQ and export see
them. The update is one foreach lerp over all parameters on their device (no host sync); lerp is
the same formula, e + (1 - d)(p - e), and leaves the EMA of constant weights exactly unchanged.
"""
import torch


class ExponentialMovingAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA_DECAY={decay} must lie in (0, 1); 0 turns the EMA off")
        self.decay = decay
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]  # the live parameters, read at every update
        self.weights = [p.detach().float().clone() for p in self.params]  # fp32, on each parameter's device

    @torch.no_grad()
    def update(self) -> None:
        """e <- decay * e + (1 - decay) * p for every parameter, after an optimizer step."""
        current = [p.detach().float() for p in self.params]  # fp32 parameters: the tensor itself, no copy
        torch._foreach_lerp_(self.weights, current, 1.0 - self.decay)

    @torch.no_grad()
    def apply_to(self, model: torch.nn.Module) -> None:
        """Write the EMA weights into `model` (this model or one with the same parameter names), each
        cast to that parameter's dtype."""
        params = dict(model.named_parameters())
        self._check_names(params.keys(), "the model")
        for name, weight in zip(self.names, self.weights):
            params[name].copy_(weight.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "weights": dict(zip(self.names, self.weights))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's EMA (same parameter names and shapes); this run's decay is kept."""
        weights = state["weights"]
        self._check_names(weights.keys(), "the checkpoint's EMA")
        for name, mine in zip(self.names, self.weights):
            if weights[name].shape != mine.shape:
                raise ValueError(f"the checkpoint's EMA holds {name} of shape {tuple(weights[name].shape)}, this model's is "
                                 f"{tuple(mine.shape)}; resume with the settings it was trained with")
            mine.copy_(weights[name])

    def _check_names(self, names, what: str) -> None:
        if set(names) != set(self.names):
            differ = sorted(set(names) ^ set(self.names))
            raise ValueError(f"{what} has other parameters than the EMA's ({', '.join(differ[:4])}"
                             f"{', ...' if len(differ) > 4 else ''}); use the model the EMA was built from")
