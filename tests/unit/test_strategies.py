"""The strategies' own rules (registry, ranks, roles, "auto" defaults) and the lr rules."""

import math

import pytest

from mpitrain.config import TrainConfig
from mpitrain.errors import UserError
from mpitrain.parallel import strategies
from mpitrain.parallel.strategies import Sync, lr_at, make_sync, scaled_lr, strategy_class
from mpitrain.parallel.strategies.base import REGISTRY


class FakeComm:
    """Enough of a communicator to build a strategy (no collective is called)."""

    def __init__(self, rank=0, size=1):
        self.rank, self.size = rank, size


def test_every_module_registers_its_strategy():
    assert strategies.names() == ("allreduce", "local-sgd", "master-worker")
    for name in strategies.names():
        assert strategy_class(name).name == name


@pytest.fixture
def registry():
    saved = dict(REGISTRY)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)


def test_a_new_strategy_is_one_subclass_and_everyone_asks_it(registry):
    class RingSync(Sync):
        name = "ring"
        min_ranks = 3
        default_sync_every = 2
        auto_lr = ("linear", "constant")

    assert "ring" in strategies.names()
    cfg = strategies.resolve(TrainConfig(strategy="ring"))
    assert (cfg.lr_scaling, cfg.lr_schedule, cfg.sync_every) == ("linear", "constant", 2)
    with pytest.raises(UserError, match="--strategy ring needs at least 3 processes: use -n 3 or more"):
        make_sync("ring", FakeComm(0, 2), None)
    assert make_sync("ring", FakeComm(1, 3), None).tag == "ring x3"
    with pytest.raises(TypeError, match="two strategies"):
        type("OtherRing", (Sync,), {"name": "ring"})


def test_unknown_strategy_is_a_one_line_error_listing_the_registry():
    with pytest.raises(UserError) as e:
        strategies.resolve(TrainConfig(strategy="ring"))
    assert str(e.value) == "--strategy must be one of allreduce, local-sgd, master-worker"


@pytest.mark.parametrize(
    "name, size, trains, roles, tag",
    [
        ("allreduce", 4, 4, "4 training ranks", "allreduce x4"),
        ("local-sgd", 1, 1, "1 training rank", "local-sgd x1"),
        ("master-worker", 5, 4, "rank 0 = master, ranks 1..4 = workers", "master-worker x4 + master"),
    ],
)
def test_roles_training_ranks_and_tag(name, size, trains, roles, tag):
    cls = strategy_class(name)
    assert cls.train_ranks_of(size) == trains
    assert cls.describe_roles(size) == roles
    sync = make_sync(name, FakeComm(0, size), None)
    assert sync.train_ranks == trains and sync.tag == tag


def test_master_worker_needs_a_master_and_a_worker():
    mw = strategy_class("master-worker")
    assert mw.min_ranks == 2 and mw.too_few_ranks(2) is None
    with pytest.raises(UserError) as e:
        make_sync("master-worker", FakeComm(0, 1), None)
    assert str(e.value) == (
        "--strategy master-worker needs at least 2 processes (1 master + workers): use -n 2 or more"
    )
    for name in ("allreduce", "local-sgd"):
        assert strategy_class(name).too_few_ranks(1) is None
    # The master validates everything and trains nothing; workers split the training data.
    assert mw.data_parts(0, 3) == ((-1, 2), (0, 1))
    assert mw.data_parts(2, 3) == ((1, 2), (0, 0))


@pytest.mark.parametrize(
    "name, scaling, schedule, sync_every",
    [
        ("allreduce", "sqrt", "cosine", None),
        ("local-sgd", "sqrt", "cosine", 4),
        ("master-worker", "none", "constant", None),
    ],
)
def test_auto_defaults_each_strategy_resolves_to(name, scaling, schedule, sync_every):
    cfg = strategies.resolve(TrainConfig(strategy=name))
    assert (cfg.lr_scaling, cfg.lr_schedule, cfg.sync_every) == (scaling, schedule, sync_every)
    # Explicit choices are kept.
    mine = strategies.resolve(TrainConfig(strategy=name, lr_scaling="linear", lr_schedule="cosine", sync_every=7))
    assert (mine.lr_scaling, mine.lr_schedule, mine.sync_every) == ("linear", "cosine", 7)


def test_lr_scaling_rules():
    assert scaled_lr(0.1, "linear", 4) == pytest.approx(0.4)
    assert scaled_lr(0.1, "sqrt", 4) == pytest.approx(0.2)
    assert scaled_lr(0.1, "linear", 9) == pytest.approx(0.9)
    assert scaled_lr(0.1, "sqrt", 9) == pytest.approx(0.3)
    assert scaled_lr(0.1, "none", 9) == 0.1
    for scaling in ("linear", "sqrt", "none"):
        assert scaled_lr(0.1, scaling, 1) == pytest.approx(0.1)  # one rank: the rate as given


def test_warmup_rises_linearly_and_reaches_the_target_on_its_last_step():
    base, target, warm = 0.1, 0.5, 4
    rates = [lr_at(base, target, warm, s) for s in range(7)]
    # step 0 already moves a quarter of the way; step warm-1 is exactly the target
    assert rates[:4] == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert rates[4:] == pytest.approx([0.5, 0.5, 0.5])
    assert lr_at(base, target, 0, 0) == target  # no warm-up: the target from the first step


def test_cosine_decays_from_the_target_to_about_zero_after_warmup():
    base, target, warm, total = 0.1, 0.4, 10, 110
    at = [lr_at(base, target, warm, s, total, "cosine") for s in range(total + 1)]
    assert at[warm - 1] == pytest.approx(target)  # end of warm-up
    assert at[warm] == pytest.approx(target)  # decay starts from the target
    assert at[warm + 50] == pytest.approx(target / 2)  # half way
    assert at[total - 1] < 0.001 * target  # the last step is close to zero
    assert at[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(at[warm:], at[warm + 1 :]))  # never rises again
    assert at[total - 1] > 0  # but the last step still learns
    # Constant stays at the target.
    assert lr_at(base, target, warm, total - 1, total, "constant") == target


def test_cosine_without_warmup_matches_the_formula():
    total = 20
    for s in (0, 5, 19):
        expected = 0.3 * 0.5 * (1 + math.cos(math.pi * s / total))
        assert lr_at(0.3, 0.3, 0, s, total, "cosine") == pytest.approx(expected)


def test_after_a_lost_rank_master_worker_goes_on_from_the_masters_round_start():
    # Survivors adopt the master's weights: the global model of its last round. Its own
    # step count only says how far it has posted pulses (a race with the workers).
    master = make_sync("master-worker", FakeComm(0, 3), None)  # one round per epoch
    assert [master.recovery_step(d) for d in (0, 7, 13)] == [0, 0, 0]
    every4 = make_sync("master-worker", FakeComm(0, 3), 4)
    assert [every4.recovery_step(d) for d in (3, 4, 7, 8, 13)] == [0, 4, 4, 8, 12]
    # allreduce ranks step together: rank 0's position is the state's.
    assert make_sync("allreduce", FakeComm(0, 3)).recovery_step(7) == 7
