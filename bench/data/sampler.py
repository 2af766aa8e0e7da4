"""Training order as a pure function of (seed, sample position).

Sample position p = iteration * batch + j. Epoch e = p // n uses its own seeded
permutation, and the horizontal flip of p is seeded too. Because nothing here keeps state,
resuming at iteration k replays exactly the samples an uninterrupted run would see, and
DDP ranks take disjoint slices of every batch without a DistributedSampler.
"""

from functools import lru_cache

import numpy as np
import torch


class TrainStream(torch.utils.data.Dataset):
    """Indexable by sample position: returns (image uint8 CHW, target)."""

    def __init__(self, dataset, seed: int, hflip: bool):
        self.dataset, self.seed, self.hflip = dataset, seed, hflip
        self.n = len(dataset)

    @lru_cache(maxsize=4)
    def _epoch(self, epoch):
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(self.n), rng.random(self.n) < 0.5

    def index(self, position):
        epoch, k = divmod(position, self.n)
        order, flips = self._epoch(epoch)
        return int(order[k]), bool(flips[k]) and self.hflip

    def __len__(self):  # unbounded stream; the sampler decides the range
        return 2 ** 62

    def __getitem__(self, position):
        idx, flip = self.index(position)
        return self.dataset.get(idx, hflip=flip)


class PositionSampler(torch.utils.data.Sampler):
    """Yields the sample positions of iterations [start, stop) that belong to `rank`."""

    def __init__(self, start_iter, stop_iter, batch, rank=0, world_size=1):
        assert batch % world_size == 0, "global batch must divide by the number of processes"
        self.start, self.stop, self.batch = start_iter, stop_iter, batch
        self.rank, self.world = rank, world_size

    def __iter__(self):
        per_rank = self.batch // self.world
        for it in range(self.start, self.stop):
            base = it * self.batch + self.rank * per_rank
            yield from range(base, base + per_rank)

    def __len__(self):
        return (self.stop - self.start) * (self.batch // self.world)


def collate(batch):
    return tuple(zip(*batch))
