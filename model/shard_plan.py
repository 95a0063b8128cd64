"""Which rank orthogonalises which Muon matrix, and how the matrices travel between ranks.

Newton-Schulz works on a matrix's wide orientation (a tall [rows > cols] matrix is transposed), so
matrices are grouped by (param group, wide shape, dtype, device): the tall MLP up-projections
[3d, d] join the wide down-projections [d, 3d] in one stack. Each group is one communication
bucket. Ownership balances Newton-Schulz FLOPs: the matrices, most expensive first, each go to the
rank with the least work so far (ties to the lowest rank), so no rank waits on another.

A bucket travels as W equal slots (reduce-scatter and all-gather need equal shares): slot r holds
rank r's matrices of that bucket in order, padded with zeros to the largest rank's count.

Buckets are ordered by when backward finishes them: a bucket is complete when its earliest-used
member (the lowest registration index) has its gradient, so the bucket whose first member comes
latest is first. Every rank computes the same plan, so collectives are issued in the same order.
"""
import dataclasses

import torch


def wide_shape(shape) -> tuple[int, int]:
    rows, cols = shape
    return (rows, cols) if rows <= cols else (cols, rows)


def newton_schulz_cost(shape) -> int:
    """FLOPs of one Newton-Schulz step on a [rows, cols] matrix in its wide orientation [m, n]:
    A = X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n). Every matrix runs the same number of steps."""
    m, n = wide_shape(shape)
    return 4 * m * m * n + 2 * m ** 3


@dataclasses.dataclass
class Bucket:
    """The matrices of one (param group, wide shape, dtype, device), with their owning ranks."""
    group: int                   # index of the optimizer param group
    params: list                 # the matrices, in registration order
    owners: list[int]            # owners[i]: the rank that orthogonalises params[i]
    world: int

    def __post_init__(self):
        self.shape = wide_shape(self.params[0].shape)
        self.numel = self.params[0].numel()
        counts = [0] * self.world
        self.position = []  # position[i]: index of params[i] inside its owner's slot
        for owner in self.owners:
            self.position.append(counts[owner])
            counts[owner] += 1
        self.slot = max(counts)  # matrices per rank slot (the padded share)

    def owned(self, rank: int) -> list[int]:
        """Indices (into params) of rank's matrices, in slot order."""
        return [i for i, owner in enumerate(self.owners) if owner == rank]

    def transposed(self, i: int) -> bool:
        rows, cols = self.params[i].shape
        return rows > cols

    def flat_offset(self, i: int) -> int:
        """Where params[i] lies in the bucket's flat [world * slot * numel] buffer."""
        return (self.owners[i] * self.slot + self.position[i]) * self.numel


class ShardPlan:
    """The buckets of a Muon optimizer's matrices for `world` ranks, seen from `rank`.

    param_groups: the optimizer's groups' parameter lists (Muon.param_groups[i]["params"]). With
    world == 1 rank 0 owns everything: the same code path, no communication.
    """

    def __init__(self, param_groups: list[list[torch.Tensor]], world: int, rank: int):
        if not 0 <= rank < world:
            raise ValueError(f"ShardPlan: rank {rank} must lie in [0, world={world})")
        self.world, self.rank = world, rank
        members: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        index = 0
        for group, params in enumerate(param_groups):
            for p in params:
                if p.dim() != 2:
                    raise ValueError(f"ShardPlan: a parameter of shape {tuple(p.shape)} is not a matrix; only Muon's 2-D weights are sharded")
                members.setdefault((group, wide_shape(p.shape), p.dtype, p.device), []).append((index, p))
                index += 1
        # readiness order: the bucket whose earliest-registered member is latest completes first in backward
        keys = sorted(members, key=lambda key: -members[key][0][0])
        owners = self._balance([[p for _, p in members[key]] for key in keys], world)
        self.buckets = [Bucket(key[0], [p for _, p in members[key]], owners[b], world) for b, key in enumerate(keys)]
        self._owner = {id(p): bucket.owners[i] for bucket in self.buckets for i, p in enumerate(bucket.params)}

    @staticmethod
    def _balance(buckets: list[list[torch.Tensor]], world: int) -> list[list[int]]:
        """owners[b][i] for every matrix: longest-processing-time-first over Newton-Schulz FLOPs."""
        items = [(b, i) for b, params in enumerate(buckets) for i in range(len(params))]
        items.sort(key=lambda item: -newton_schulz_cost(buckets[item[0]][item[1]].shape))  # stable: ties keep order
        load = [0] * world
        owners = [[0] * len(params) for params in buckets]
        for b, i in items:
            rank = min(range(world), key=lambda r: (load[r], r))
            owners[b][i] = rank
            load[rank] += newton_schulz_cost(buckets[b][i].shape)
        return owners

    def owner(self, p: torch.Tensor) -> int:
        return self._owner[id(p)]

    def owns(self, p: torch.Tensor) -> bool:
        return self._owner[id(p)] == self.rank

    def load(self) -> list[int]:
        """Newton-Schulz FLOPs per step (per Newton-Schulz iteration) of each rank."""
        work = [0] * self.world
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                work[bucket.owners[i]] += newton_schulz_cost(p.shape)
        return work
