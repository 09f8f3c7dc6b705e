import math

import pytest

from scaling_abs.schedules import (
    AdaptiveBatchSize,
    ConstantBatch,
    IncreaseBatch,
    LinearScalingWarmup,
    StepSettings,
    build_schedule,
    poly_decay,
    step_decay,
)

ALL = ["bl", "fb", "gg", "abs", "absa"]


def make(strategy):
    return build_schedule(
        strategy,
        batch_size=128,
        max_batch_size=2048,
        lr_decay=0.2,
        lr_decay_epochs=[5, 10, 15],
        warmup_epochs=2,
        adv_fraction=0.2,
        adv_stop_epoch=10,
    )


def test_step_decay():
    assert step_decay(0, 0.2, [5, 10]) == 1
    assert step_decay(5, 0.2, [5, 10]) == pytest.approx(0.2)
    assert step_decay(12, 0.2, [5, 10]) == pytest.approx(0.04)


def test_poly_decay_is_the_i2_schedule():
    # 0.01 -> 1e-4 quadratically by epoch 60, constant after (paper Appendix B, I2)
    lr = [0.01 * poly_decay(e, 60, 2, 0.01) for e in (0, 15, 30, 45, 60, 75)]
    expected = [1e-4 + (0.01 - 1e-4) * (1 - e / 60) ** 2 for e in (0, 15, 30, 45)] + [1e-4, 1e-4]
    assert lr == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("strategy", ["bl", "fb", "abs", "absa"])
def test_poly_replaces_the_step_decays(strategy):
    kw = dict(batch_size=128, max_batch_size=1024, lr_decay=0.2, lr_decay_epochs=[5], warmup_epochs=0)
    step = build_schedule(strategy, **kw)
    poly = build_schedule(strategy, **kw, lr_poly=(10, 2, 0.1))
    scale = step.at(0).lr_multiplier  # FB's linear scaling, 1 for the others
    assert poly.at(0).lr_multiplier == pytest.approx(scale)
    assert poly.at(5).lr_multiplier == pytest.approx(scale * (0.1 + 0.9 * 0.25))  # no step at 5
    assert poly.at(12).lr_multiplier == pytest.approx(scale * 0.1)
    with pytest.raises(ValueError, match="lr_poly"):
        build_schedule(strategy, **kw, lr_poly=(0, 2, 0.1))


def test_gg_follows_a_poly_schedule_with_multiples_of_its_batch():
    s = build_schedule("gg", batch_size=128, max_batch_size=1024, lr_poly=(10, 2, 0.1))
    sizes = [s.at(e).batch_size for e in (0, 2, 5, 8, 12)]
    assert sizes == sorted(sizes) and sizes[0] == 128 and sizes[-1] == 1024
    assert all(b % 128 == 0 for b in sizes)
    for e in (0, 2, 5, 8, 12):  # lr / B follows BL's decayed lr / 128
        at = s.at(e)
        assert at.lr_multiplier / at.batch_size == pytest.approx(poly_decay(e, 10, 2, 0.1) / 128)


@pytest.mark.parametrize("strategy", ALL)
def test_every_schedule_speaks_the_protocol(strategy):
    s = make(strategy)
    first = s.at(0.0)
    assert isinstance(first, StepSettings) and first.batch_size > 0 and first.lr_multiplier > 0
    assert 0 <= first.adv_fraction <= 1
    assert (first.adv_fraction > 0) == (strategy == "absa")
    assert s.adaptive == (strategy in ("abs", "absa"))
    # state round trip: a fresh schedule loaded from the state continues identically
    for eig in (8.0, 3.0, 2.9):
        s.observe(eig)
    fresh = make(strategy)
    fresh.load_state_dict(s.state_dict())
    for e in (0.0, 4.9, 5.0, 11.0, 16.0):
        assert fresh.at(e) == s.at(e)
    assert fresh.observe(1.0) == s.observe(1.0) and fresh.at(1.0) == s.at(1.0)


def test_bl():
    s = ConstantBatch(128, lr_decay=0.2, lr_decay_epochs=[5, 10])
    assert [s.at(e).batch_size for e in (0, 7, 12)] == [128] * 3
    assert [round(s.at(e).lr_multiplier, 6) for e in (0, 4.99, 5, 10)] == [1, 1, 0.2, 0.04]


def test_fb_warmup_then_linear_scaling_then_decay():
    s = LinearScalingWarmup(1024, base_batch_size=128, warmup_epochs=4, lr_decay=0.1, lr_decay_epochs=[6])
    assert s.at(0).lr_multiplier == 1.0
    assert s.at(2).lr_multiplier == pytest.approx(4.5)  # halfway from 1 to 8
    assert s.at(4).lr_multiplier == pytest.approx(8.0)
    assert s.at(6).lr_multiplier == pytest.approx(0.8)
    assert {s.at(e).batch_size for e in (0, 3, 7)} == {1024}


def test_gg_grows_instead_of_decaying_then_decays_at_the_cap():
    s = IncreaseBatch(128, 2048, lr_decay=0.2, lr_decay_epochs=[5, 10, 15])
    got = [(s.at(e).batch_size, round(s.at(e).lr_multiplier, 6)) for e in (0, 5, 10, 15)]
    # 128 -> 640 -> 3200 capped at 2048 (LR takes 2048/3200) -> 16000 capped (LR 2048/16000)
    assert got == [(128, 1.0), (640, 1.0), (2048, 0.64), (2048, 0.128)]
    # the noise scale lr / B matches BL's at every epoch
    bl = ConstantBatch(128, lr_decay=0.2, lr_decay_epochs=[5, 10, 15])
    for e in (0, 5, 10, 15):
        assert s.at(e).lr_multiplier / s.at(e).batch_size == pytest.approx(bl.at(e).lr_multiplier / 128)


def test_abs_grows_on_halving_and_resets_reference():
    s = AdaptiveBatchSize(128, 4096, alpha=2, beta=2, kappa=10)
    assert (
        s.observe(10.0) is False and s.batch_size == 128 and s.reference == 10.0
    )  # first sets the reference
    assert s.observe(5.1) is False and s.batch_size == 128
    assert s.observe(5.0) is True and s.batch_size == 256 and s.reference == 5.0  # <= ref / alpha
    assert s.checks_without_growth == 0
    assert s.observe(3.0) is False and s.observe(2.5) is True and s.batch_size == 512


def test_abs_kappa_grows_without_moving_the_reference():
    s = AdaptiveBatchSize(128, 4096, kappa=3)
    s.observe(10.0)
    assert [s.observe(9.0) for _ in range(3)] == [False, False, True]
    assert s.batch_size == 256 and s.reference == 10.0
    assert [s.observe(9.0) for _ in range(3)] == [False, False, True] and s.batch_size == 512


def test_a_run_with_kappa_checks_or_fewer_is_told_that_kappa_cannot_grow_it():
    s = AdaptiveBatchSize(128, 4096, kappa=3)
    three = s.too_few_checks(3, 1000)
    assert three.startswith("3 curvature checks before the last step, and kappa=3 grows the batch at check 4")
    assert "1/alpha of the first" in three and "hessian_every <= 1000 would make 4" in three
    assert s.too_few_checks(1, 0).startswith("1 curvature check before")  # one cannot grow it
    assert "cannot grow" in s.too_few_checks(1, 0) and "too few steps for 4" in s.too_few_checks(1, 0)
    assert s.too_few_checks(4, 1000) is None  # the reference, then 3 without a drop: grows at the 4th
    for _ in range(4):
        s.observe(10.0)
    assert s.batch_size == 256
    assert AdaptiveBatchSize(128, 128, kappa=3).too_few_checks(1, 0) is None  # at B_max: no checks


def test_abs_cap_stops_checks_and_adversarial_examples():
    s = AdaptiveBatchSize(128, 300, kappa=1, adv_fraction=0.2)
    s.observe(1.0)
    assert s.observe(1.0) and s.batch_size == 256 and s.adv_fraction == pytest.approx(0.1)
    assert s.observe(1.0) and s.batch_size == 300 and s.adv_fraction == 0.0
    assert not s.wants_checks
    assert s.observe(0.01) is False and s.batch_size == 300


def test_absa_gamma_decay_and_tau():
    s = AdaptiveBatchSize(128, 4096, kappa=1, adv_fraction=0.2, adv_decay=2, adv_stop_epoch=10)
    s.observe(1.0)
    s.observe(1.0)
    assert s.at(3).adv_fraction == pytest.approx(0.1)
    assert s.at(9.99).adv_fraction == pytest.approx(0.1)
    assert s.at(10).adv_fraction == 0.0


@pytest.mark.parametrize("decay_on, gammas", [("growth", [0.1, 0.05, 0.025]), ("drop", [0.2, 0.1, 0.1])])
def test_absa_gamma_decays_at_every_growth_or_at_drops_only(decay_on, gammas):
    """Algorithm 1 halves gamma in its drop branch only (line 12; the kappa branch, lines 16-18,
    leaves it); DESIGN.md's reading, the default, at every growth."""
    s = AdaptiveBatchSize(128, 4096, kappa=2, adv_fraction=0.2, adv_decay_on=decay_on)
    after = []
    for eig in (10.0, 9.0, 9.0, 4.0, 3.9, 3.9):  # reference; kappa growth; drop; kappa growth
        if s.observe(eig):
            after.append(s.adv_fraction)
    assert s.batch_size == 1024 and s.reference == 4.0
    assert after == pytest.approx(gammas)
    # at the cap gamma is 0 either way
    capped = AdaptiveBatchSize(128, 256, kappa=1, adv_fraction=0.2, adv_decay_on=decay_on)
    assert not capped.observe(1.0) and capped.observe(1.0) and capped.adv_fraction == 0.0


@pytest.mark.parametrize("rule, expected", [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_lr_rules(rule, expected):
    s = AdaptiveBatchSize(128, 4096, kappa=1, lr_scaling=rule, lr_decay=0.1, lr_decay_epochs=[5])
    for eig in (1.0, 1.0, 1.0):
        s.observe(eig)
    assert s.batch_size == 512
    assert s.lr_scale == pytest.approx(expected)
    assert s.at(0).lr_multiplier == pytest.approx(expected)
    assert s.at(6).lr_multiplier == pytest.approx(expected * 0.1)


def test_non_finite_eigenvalues_are_ignored():
    s = AdaptiveBatchSize(128, 4096, kappa=1)
    assert s.observe(float("nan")) is False and s.reference is None
    s.observe(4.0)
    before = s.state_dict()
    assert s.observe(math.inf) is False and s.observe(float("nan")) is False
    assert s.state_dict() == before


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_batch_size": 64}, "max_batch_size"),
        ({"beta": 1}, "beta"),
        ({"alpha": 1}, "alpha"),
        ({"kappa": 0}, "kappa"),
        ({"adv_fraction": -0.1}, "adv_fraction"),
        ({"adv_fraction": 1.1}, "adv_fraction"),
        ({"adv_decay": 0.5}, "adv_decay"),
        ({"lr_scaling": "cubic"}, "lr_scaling"),
        ({"adv_decay_on": "kappa"}, "adv_decay_on"),
        ({"lr_decay": 0}, "lr_decay"),
        # not numbers in range: NaN and infinity used to pass (kappa=nan switched the kappa rule off)
        ({"kappa": math.nan}, "kappa"),
        ({"beta": math.inf}, "beta"),
        ({"alpha": math.nan}, "alpha"),
        ({"adv_decay": math.nan}, "adv_decay"),
        ({"batch_size": 100.0}, "batch_size must be an integer"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = {"batch_size": 128, "max_batch_size": 1024, **kwargs}
    with pytest.raises(ValueError, match=name):
        AdaptiveBatchSize(args.pop("batch_size"), args.pop("max_batch_size"), **args)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        build_schedule("sgd", batch_size=128, max_batch_size=256)


def test_abs_grows_by_at_least_one_sample_and_reads_magnitudes():
    s = AdaptiveBatchSize(128, 4096, beta=1.001, kappa=1, adv_fraction=0.2)
    s.observe(10.0)
    assert s.observe(9.0) and s.batch_size == 129  # 128 * 1.001 rounds back to 128
    # the top eigenvalue is the largest in magnitude and can be negative: -4 is a drop from -10
    s = AdaptiveBatchSize(128, 1024, kappa=10)
    assert [s.observe(e) for e in (-10.0, -20.0, -4.0)] == [False, False, True]
    assert s.reference == -4.0 and s.batch_size == 256


def test_errors_name_the_argument_given():
    with pytest.raises(ValueError, match=r"^batch_size \(64\) must be >= base_batch_size \(128\)"):
        LinearScalingWarmup(64, base_batch_size=128)
    with pytest.raises(ValueError, match="^base_batch_size must be"):
        LinearScalingWarmup(64, base_batch_size=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        LinearScalingWarmup(256, warmup_epochs=math.nan)
    s = AdaptiveBatchSize(128, 1024)
    state = {**s.state_dict(), "batch_size": -5}
    with pytest.raises(ValueError, match="outside"):
        s.load_state_dict(state)


def test_abs_grown_batches_split_over_the_processes():
    # a non-integer beta: 128 * 1.1 = 140.8 -> 141, which 2 processes cannot share; 142 they can
    s = AdaptiveBatchSize(128, 1024, beta=1.1, kappa=1, multiple_of=2)
    s.observe(10.0)
    assert s.observe(9.0) and s.batch_size == 142
    sizes = []
    for _ in range(3):
        s.observe(9.0)
        sizes.append(s.batch_size)
    assert sizes == [156, 172, 190]  # 142 * 1.1 = 156.2 -> 156, 171.6 -> 172, 189.2 -> 189 -> 190
    with pytest.raises(ValueError, match="multiples of multiple_of"):
        AdaptiveBatchSize(127, 1024, multiple_of=2)
