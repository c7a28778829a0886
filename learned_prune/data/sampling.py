"""Samplers of the data modules."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffle(Sampler[int]):
    """A seeded shuffle that can start part-way through an epoch (for a resumed run).

    Epoch e visits the order ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    gives in its epoch e (each epoch there draws the workers' base seed and two permutations, the
    second for an empty remainder, from that generator), so runs from before this sampler keep their data order; Lightning calls
    :meth:`set_epoch`. ``skip`` drops the first indices of the next epoch served: the samples an
    interrupted run already trained on.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base-seed draw
            perm = torch.randperm(self.n, generator=g)
            torch.randperm(self.n, generator=g)  # RandomSampler draws its (empty) remainder permutation too
        return perm.tolist()

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.order(self.epoch)[skip:])

    def __len__(self) -> int:
        return self.n
