"""A rank's complete training state as arrays, and its trip to and from rank 0.

The state is every model variable (weights, plus Keras' seed-generator state that drives
dropout), every optimizer variable (step counter, learning rate, moments), the trainer's
running sums for the current epoch, and the strategy's own counters. Saving it and loading
it back gives bit-identical continuation where the kernels are deterministic.

Exchange: each rank packs its arrays into one uint8 buffer; rank 0 gathers them (all have
the same size, since every rank holds the same model) for a checkpoint, and scatters them
back on resume, so only rank 0 ever touches the run folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mpitrain.errors import agree

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


def _pack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays])


def _unpack(buf: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, at = [], 0
    for a in like:
        n = a.size * a.dtype.itemsize
        out.append(buf[at : at + n].view(a.dtype).reshape(a.shape).copy())
        at += n
    return out


class RankState:
    def __init__(self, model, optimizer, sync):
        self.variables = list(model.variables) + list(optimizer.variables)
        self.sync = sync

    def arrays(self, stats: np.ndarray) -> list[np.ndarray]:
        return [np.array(v.numpy()) for v in self.variables] + [
            np.asarray(stats, np.float64).copy(),
            self.sync.extra_state(),
        ]

    def load(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Assign a saved state; returns the saved running sums of the epoch."""
        for v, a in zip(self.variables, arrays):
            v.assign(a)
        self.sync.load_extra_state(arrays[-1])
        return arrays[-2].copy()

    def gather(self, comm: Comm, stats: np.ndarray) -> tuple[list[list[np.ndarray]], bool] | None:
        """Collective. Rank 0: (list of every rank's arrays, all identical?); others: None."""
        mine = self.arrays(stats)
        rows = comm.gather_flat(_pack(mine))
        if rows is None:
            return None
        identical = all(np.array_equal(rows[0], r) for r in rows[1:])
        states = [_unpack(rows[0], mine)] if identical else [_unpack(r, mine) for r in rows]
        return states, identical

    def scatter(self, comm: Comm, ckpt) -> np.ndarray:
        """Collective. Rank 0 holds `ckpt`; every rank loads its own state from it."""
        parts, error = None, None
        if comm.rank == 0:
            like = self.arrays(np.zeros(3))
            # Ranks whose states differ (local-sgd, master-worker) resume rank for rank; with
            # another number of ranks only an --elastic run may go on, every rank from rank 0's
            # state, as the survivors of a lost rank do (`broadcast`).
            adopt = not ckpt.shared and ckpt.ranks != comm.size
            if adopt and not ckpt.config.get("elastic"):
                error = (
                    f"the checkpoint was written by {ckpt.ranks} processes with --strategy "
                    f"{ckpt.strategy}; resume it with -n {ckpt.ranks}"
                )
            elif any(
                len(s) != len(like) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(s, like))
                for s in ckpt.states
            ):
                error = "the checkpoint does not match this model and optimizer"
            else:
                parts = [_pack(ckpt.state_of(0 if adopt else r)) for r in range(comm.size)]
        agree(comm, error)  # collective: all ranks stop together on a mismatch
        buf = comm.scatter_rows(parts)
        return self.load(_unpack(buf, self.arrays(np.zeros(3))))

    def broadcast(self, comm: Comm) -> np.ndarray:
        """Collective. Every rank adopts rank 0's complete state (after a rank was lost)."""
        buf = _pack(self.arrays(np.zeros(3)))
        comm.bcast_(buf, 0)
        return self.load(_unpack(buf, self.arrays(np.zeros(3))))
