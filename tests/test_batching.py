import pytest

from scaling_abs.batching import MicroBatchSampler, Plan, SampleOrder, make_plan


@pytest.mark.parametrize(
    "batch, micro, world, expected",
    [
        (64, 16, 1, Plan(64, 16, 4, 1)),
        (64, 64, 1, Plan(64, 64, 1, 1)),
        (128, 256, 2, Plan(128, 64, 1, 2)),
        (1024, 256, 2, Plan(1024, 256, 2, 2)),
        (8192, 512, 4, Plan(8192, 512, 4, 4)),
        (640, 512, 1, Plan(640, 320, 2, 1)),  # GG's 128 x 5 with micro-batches of 512
        (100, 64, 1, Plan(100, 50, 2, 1)),
        (972, 256, 1, Plan(972, 243, 4, 1)),  # 128 x 1.5^5, rounded: a non-integer beta
    ],
)
def test_plan_splits_global_batch(batch, micro, world, expected):
    plan = make_plan(batch, micro, world)
    assert plan == expected
    assert plan.micro <= micro
    assert plan.micro * plan.accumulation * plan.world == batch


@pytest.mark.parametrize("batch, micro, world", [(96, 16, 5), (0, 16, 1), (64, 0, 1)])
def test_plan_rejects_indivisible(batch, micro, world):
    with pytest.raises(ValueError, match="batch|sizes"):
        make_plan(batch, micro, world)


def test_order_is_a_permutation_per_epoch_and_seeded():
    order = SampleOrder(10, seed=3)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second  # epoch e uses seed + e
    assert SampleOrder(10, seed=3).indices(0, 10) == first
    assert SampleOrder(10, seed=4).indices(0, 10) != first
    # reading across the boundary is the concatenation
    assert order.indices(7, 6) == first[7:] + second[:3]


def test_micro_batches_cover_the_global_batch_whatever_the_split():
    order = SampleOrder(50, seed=0)
    whole = MicroBatchSampler(order, make_plan(16, 16, 1), start=5)
    it = iter(whole)
    reference = [next(it), next(it)]  # two steps of 16

    for micro, world in [(4, 1), (8, 2), (2, 4)]:
        plan = make_plan(16, micro, world)
        per_step = []
        for step in range(2):
            got = []
            for rank in range(world):
                it = iter(MicroBatchSampler(order, plan, start=5, rank=rank))
                chunks = [next(it) for _ in range(plan.accumulation * (step + 1))][-plan.accumulation :]
                assert all(len(c) == micro for c in chunks)
                got.extend(i for c in chunks for i in c)
            per_step.append(got)
        assert per_step == reference


def test_stream_position_makes_growth_and_resume_consistent():
    """A run that grows its batch or resumes builds a new sampler at the consumed-sample count: its
    micro-batches (indices and augmentation seeds) continue the uninterrupted stream, across the
    epoch boundary too."""

    def take(sampler, n):
        it = iter(sampler)
        return [(list(m), m.seed) for m in (next(it) for _ in range(n))]

    order = SampleOrder(40, seed=1)
    # uninterrupted: 8 steps of 8 samples in micro-batches of 8 (64 samples: epoch 0, then 1)
    stream = take(MicroBatchSampler(order, make_plan(8, 8, 1), start=0), 8)
    assert sorted(i for m, _ in stream[:5] for i in m) == list(range(40))  # one epoch: each sample once
    assert len({s for _, s in stream}) == 8
    # 3 steps at 8, growth to 16 (two micro-batches of 8) at 24, a resume at 56 in a fresh order
    grown = take(MicroBatchSampler(order, make_plan(8, 8, 1), start=0), 3)
    grown += take(MicroBatchSampler(order, make_plan(16, 8, 1), start=24), 4)
    grown += take(MicroBatchSampler(SampleOrder(40, seed=1), make_plan(8, 8, 1), start=56), 1)
    assert grown == stream


def test_a_batch_without_a_divisor_near_the_micro_batch_warns():
    from scaling_abs.batching import small_micro_batches

    assert make_plan(127, 64) == Plan(127, 1, 127, 1)  # equal micro-batches: 127 is prime
    message = small_micro_batches(make_plan(127, 64), 64)
    assert "127 micro-batches of 1" in message and "micro_batch_size=64" in message
    assert small_micro_batches(make_plan(1031 * 4, 512, 4), 512) is not None  # 1031 a process, prime
    for batch, micro, world in ((128, 64, 1), (640, 512, 1), (96, 512, 2), (3, 64, 1)):
        assert small_micro_batches(make_plan(batch, micro, world), micro) is None


def test_odd_arguments_are_refused():
    for args in ((100.0, 32), (True, 32), (128, 0)):
        with pytest.raises(ValueError, match="must be an integer > 0"):
            make_plan(*args)
    with pytest.raises(ValueError, match=">= 0"):
        SampleOrder(5).indices(-3, 4)
    with pytest.raises(ValueError, match="rank"):
        MicroBatchSampler(SampleOrder(8), make_plan(8, 4, 2), 0, rank=5)
