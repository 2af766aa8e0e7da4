"""The data order: a pure function of (seed, position), split over processes, and with
aspect-ratio grouping one orientation per forward pass."""

import numpy as np

from bench.data.sampler import PositionSampler, TrainStream


class Shapes:
    """A dataset that only knows its images' orientations."""

    def __init__(self, landscape):
        self._landscape = list(landscape)

    def __len__(self):
        return len(self._landscape)

    def landscape(self):
        return self._landscape

    def get(self, index, hflip=False):
        return index, hflip


def test_processes_take_disjoint_slices_of_every_batch_in_order():
    one = list(PositionSampler(3, 6, batch=4))
    two = [list(PositionSampler(3, 6, batch=4, rank=r, world_size=2)) for r in range(2)]
    assert one == list(range(12, 24))
    for it in range(3):  # iteration by iteration, rank 0 then rank 1 is the single order
        assert two[0][2 * it:2 * it + 2] + two[1][2 * it:2 * it + 2] == one[4 * it:4 * it + 4]


def test_the_order_depends_only_on_seed_and_position():
    ds = Shapes([True] * 10)
    a, b = TrainStream(ds, seed=3, hflip=True), TrainStream(ds, seed=3, hflip=True)
    assert [a[p] for p in range(35)] == [b[p] for p in reversed(range(35))][::-1]
    assert sorted(a[p][0] for p in range(10)) == list(range(10))  # an epoch is a permutation
    assert [a[p] for p in range(10)] != [TrainStream(ds, seed=4, hflip=True)[p] for p in range(10)]


def test_aspect_grouping_gives_every_pass_one_orientation_but_a_few():
    rng = np.random.default_rng(0)
    landscape = rng.random(103) < 0.7          # COCO is mostly landscape
    ds, g = Shapes(landscape), 4
    stream = TrainStream(ds, seed=0, hflip=False, group=g)
    assert stream.n == 104                     # topped up to whole passes
    for epoch in range(3):
        idx = [stream[p][0] for p in range(epoch * stream.n, (epoch + 1) * stream.n)]
        assert set(idx) == set(range(103))     # every image, every epoch
        chunks = [landscape[idx[i:i + g]] for i in range(0, len(idx), g)]
        mixed = [c for c in chunks if c.any() and not c.all()]
        assert len(mixed) <= 2                 # only the leftovers of each orientation
    ungrouped = TrainStream(ds, seed=0, hflip=False)
    chunks = [landscape[[ungrouped[p][0] for p in range(i, i + g)]] for i in range(0, 100, g)]
    assert sum(c.any() and not c.all() for c in chunks) > 10   # what grouping avoids


def test_grouping_works_on_a_set_smaller_than_a_pass():
    stream = TrainStream(Shapes([True]), seed=0, hflip=False, group=3)
    assert stream.n == 3 and [stream[p][0] for p in range(6)] == [0] * 6
