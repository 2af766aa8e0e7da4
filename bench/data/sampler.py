"""Training order as a pure function of (seed, sample position).

Sample position p = iteration * batch + j. Epoch e = p // n uses its own seeded
permutation, and the horizontal flip of p is seeded too. Because nothing here keeps state,
resuming at iteration k replays exactly the samples an uninterrupted run would see, and
DDP ranks take disjoint slices of every batch without a DistributedSampler.

Aspect-ratio grouping (detectron2's ASPECT_RATIO_GROUPING) is made stateless the same way:
an epoch's permutation is cut into chunks of `group` images (one forward pass) of one
orientation, landscape or portrait, and the chunks are shuffled. The few images left over
in each orientation share the epoch's last chunks, and the epoch is topped up to a whole
number of chunks with images from its start, so chunks stay aligned with forward passes.
"""

from functools import lru_cache

import numpy as np
import torch


class TrainStream(torch.utils.data.Dataset):
    """Indexable by sample position: returns (image uint8 CHW, target)."""

    def __init__(self, dataset, seed: int, hflip: bool, group: int = 0):
        """`group`: images per forward pass to draw from one orientation (0: no grouping);
        `dataset.landscape()` tells each image's orientation."""
        self.dataset, self.seed, self.hflip, self.group = dataset, seed, hflip, group
        self.landscape = np.asarray(dataset.landscape(), dtype=bool) if group else None
        self.n = -(-len(dataset) // group) * group if group else len(dataset)

    @lru_cache(maxsize=4)
    def _epoch(self, epoch):
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        size = len(self.dataset)
        order, flips = rng.permutation(size), rng.random(self.n) < 0.5
        if not self.group:
            return order, flips
        g, chunks, rest = self.group, [], []
        for orientation in (True, False):
            same = order[self.landscape[order] == orientation]
            whole = len(same) // g * g
            chunks += [same[i:i + g] for i in range(0, whole, g)]
            rest += list(same[whole:])
        # np.resize repeats the order when the set is smaller than the top-up
        rest = np.concatenate([np.asarray(rest, dtype=order.dtype),
                               np.resize(order, (-len(rest)) % g)])
        chunks += [rest[i:i + g] for i in range(0, len(rest), g)]
        return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))]), flips

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
