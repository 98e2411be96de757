"""--compress bf16: the allreduce strategy's gradient buffer reduced in bfloat16, the step's
statistics exact in float32; the option's rules (which strategies take it)."""

import numpy as np
import pytest

from mpitrain.config import TrainConfig
from mpitrain.errors import UserError
from mpitrain.parallel.strategies import compressions, make_sync, resolve
from mpitrain.parallel.strategies.allreduce import bf16_add, from_bf16, to_bf16


def test_rounding_to_bfloat16_is_to_nearest_even_and_keeps_specials():
    x = np.array([1.0, -2.5, 0.0, np.inf, -np.inf, 2.0**127, 2.0**-130], np.float32)
    assert np.array_equal(from_bf16(to_bf16(x)), x)  # representable values pass unchanged
    one = np.float32(1.0).view(np.uint32)
    # 1 + half an ulp of bfloat16 (2^-8) is a tie: to even (1.0); just above it rounds up.
    tie, above = np.array([one + 0x8000, one + 0x8001], np.uint32).view(np.float32)
    assert from_bf16(to_bf16(np.array([tie, above])))[0] == 1.0
    assert from_bf16(to_bf16(np.array([tie, above])))[1] == np.float32(1 + 2**-7)
    odd = np.float32(1 + 2**-7).view(np.uint32)  # an odd last bit: a tie rounds up, to even
    assert from_bf16(to_bf16(np.array([odd + 0x8000], np.uint32).view(np.float32)))[0] == np.float32(1 + 2**-6)
    nan = np.array([0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)  # NaNs whose carry would make inf
    assert np.isnan(from_bf16(to_bf16(nan))).all()
    rng = np.random.default_rng(0)
    g = rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10_000)
    rel = np.abs(from_bf16(to_bf16(g)) - g) / np.abs(g)
    assert rel.max() <= 2**-8 and rel.mean() > 2**-12  # half a bfloat16 ulp (8 significant bits), and not exact


def test_the_bfloat16_sum_commutes_and_rounds_once():
    rng = np.random.default_rng(1)
    a, b = to_bf16(rng.standard_normal(1000).astype(np.float32)), to_bf16(rng.standard_normal(1000).astype(np.float32))
    ab, ba = b.copy(), a.copy()
    bf16_add(a, ab)
    bf16_add(b, ba)
    assert np.array_equal(ab, ba)  # MPI may combine in either order
    assert np.array_equal(ab, to_bf16(from_bf16(a) + from_bf16(b)))


class SumComm:
    """Rank 0 of `size` ranks whose peers hold the step buffers `others` (their stop votes 0):
    every collective is computed here, in rank order, and the dtype and length of each
    message is recorded."""

    def __init__(self, others):
        self.rank, self.size, self.sent = 0, len(others) + 1, []
        self.others = [np.append(o, np.float32(0)) for o in others]  # + the stop vote slot

    def allreduce_sum_(self, buf):
        self.sent.append((buf.dtype, buf.size))
        for other in self.others:
            buf += other[-buf.size :]  # the whole buffer, or its float32 tail
        return buf

    def allreduce_op_(self, buf, combine):
        self.sent.append((buf.dtype, buf.size))
        for other in self.others:
            combine(to_bf16(other[: buf.size]), buf)
        return buf


def _step_buffers(ranks=3, n=5000, seed=2):
    rng = np.random.default_rng(seed)
    bufs = []
    for r in range(ranks):
        grads = rng.standard_normal(n).astype(np.float32) * 0.01
        stats = np.array([32 + r, 1234.5678 + r, 17 + r], np.float32)  # samples, loss sum, hits
        bufs.append(np.concatenate([grads, stats]))
    return bufs


@pytest.mark.parametrize("compress", ["none", "bf16"])
def test_the_gradient_travels_in_bfloat16_and_the_statistics_exactly(compress):
    mine, *others = _step_buffers()
    comm = SumComm(others)
    sync = make_sync("allreduce", comm, None, compress=compress)
    out = sync.reduce_step(mine.copy())
    exact = mine.astype(np.float64) + sum(o.astype(np.float64) for o in others)
    assert out.dtype == np.float32 and out.shape == mine.shape
    assert np.array_equal(out[-3:], (mine[-3:] + others[0][-3:] + others[1][-3:]))  # float32, exact counts
    err = np.abs(out[:-3] - exact[:-3])
    if compress == "none":
        assert comm.sent == [(np.float32, mine.size + 1)]  # + the stop vote
        assert err.max() < 1e-8
    else:
        # Half the bytes for the gradients, then 3 float32 statistics and the stop vote.
        assert comm.sent == [(np.uint16, mine.size - 3), (np.float32, 4)]
        # Each of the 3 contributions and 2 partial sums is rounded once: within a few
        # bfloat16 ulps of the exact sum, but not equal to it.
        scale = 3 * np.abs(np.stack([mine, *others])[:, :-3]).sum(0)  # 5 roundings, each <= 2^-8 of its value
        assert (err <= 2**-8 * scale).all()
        assert err.max() > 1e-6


def test_compress_is_a_rule_of_the_allreduce_strategy():
    assert compressions() == ("none", "bf16")
    assert resolve(TrainConfig(compress="bf16")).compress == "bf16"
    for strategy in ("local-sgd", "master-worker"):
        with pytest.raises(UserError) as e:
            resolve(TrainConfig(strategy=strategy, compress="bf16"))
        assert str(e.value) == (
            f"--compress bf16 compresses the gradients of allreduce; --strategy {strategy} takes --compress none"
        )
        resolve(TrainConfig(strategy=strategy, compress="none"))


def test_one_line_error_from_the_command_line(capsys):
    from mpitrain.cli import main

    assert main(["train", "--strategy", "local-sgd", "--compress", "bf16", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpitrain: error: --compress bf16 compresses")
    assert main(["bench", "-n", "2", "--strategy", "master-worker", "--compress", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strategy master-worker takes --compress none" in err[0]


@pytest.mark.parametrize("compress", ["none", "bf16"])
def test_a_peers_stop_vote_travels_exactly_with_either_buffer(compress):
    mine, *others = _step_buffers()
    comm = SumComm(others)
    comm.others[1][-1] = 1.0  # rank 2 was asked to stop
    sync = make_sync("allreduce", comm, None, compress=compress)
    out = sync.reduce_step(mine.copy())
    assert out.shape == mine.shape and sync.stop_agreed(1, 10)
    quiet = make_sync("allreduce", SumComm(others), None, compress=compress)
    quiet.reduce_step(mine.copy())
    assert not quiet.stop_agreed(1, 10)
