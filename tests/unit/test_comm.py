"""The comm layer: one protocol, two sibling implementations that both implement all of it.

These tests never start MPI: they look at the classes, not at communicators.
"""

import inspect

import numpy as np
import pytest

from mpitrain.parallel.comm import Comm, MPIComm, SingleComm

IMPLEMENTATIONS = [SingleComm, MPIComm]


def public_members(cls) -> set[str]:
    """Public methods and attributes, declared ones (annotations) included."""
    names = {n for n in dir(cls) if not n.startswith("_")}
    for klass in cls.__mro__:
        names |= {n for n in vars(klass).get("__annotations__", {}) if not n.startswith("_")}
    return names


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_protocol_lists_what_the_package_uses():
    assert public_members(Comm) == {
        "rank",
        "size",
        "local_size",
        "local_rank",
        "elastic",
        "failed",
        "lost_any",
        "world_ranks",
        "make_elastic",
        "shrink",
        "allreduce_sum_",
        "allreduce_op_",
        "allreduce_max",
        "iallreduce_sum_",
        "iallreduce_op_",
        "bcast_",
        "gather_flat",
        "gather_rows",
        "allgather_obj",
        "bcast_obj",
        "node_allgather_obj",
        "scatter_rows",
        "barrier",
        "ibarrier",
        "test",
        "abort",
    }


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_has_exactly_the_protocols_members(cls):
    members = public_members(cls)
    assert not public_members(Comm) - members, f"{cls.__name__} lacks a member of Comm"
    assert not members - public_members(Comm), f"{cls.__name__} has a public member Comm does not list"


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_methods_take_the_protocols_parameters(cls):
    for name in public_members(Comm):
        want = getattr(Comm, name, None)
        if callable(want):
            assert callable(getattr(cls, name)), f"{cls.__name__}.{name}"
            assert _params(getattr(cls, name)) == _params(want), f"{cls.__name__}.{name}"


def test_the_two_are_siblings_not_parent_and_child():
    # With inheritance, a method the MPI class forgot would silently be the one-process identity.
    assert not issubclass(MPIComm, SingleComm) and not issubclass(SingleComm, MPIComm)


def test_single_comm_collectives_are_the_identity():
    c = SingleComm()
    buf = np.arange(4.0)
    assert c.allreduce_sum_(buf) is buf and c.bcast_(buf) is buf
    assert c.gather_flat(buf).shape == (1, 4)
    assert c.allgather_obj("x") == ["x"] and c.bcast_obj(3) == 3
    assert c.scatter_rows([buf]) is buf and c.shrink() == [] and c.world_ranks == [0]
    assert (c.rank, c.size, c.local_size, c.elastic, c.failed, c.lost_any) == (0, 1, 1, False, False, False)
    assert c.local_rank == 0 and c.node_allgather_obj("x") == ["x"]
    request = c.iallreduce_sum_(buf)
    assert c.test(request) and list(buf) == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("cls", [Comm, *IMPLEMENTATIONS], ids=lambda c: c.__name__)
def test_every_member_is_annotated_as_in_the_protocol(cls):
    # The protocol is the package's contract with MPI: a type checker holds callers to it only
    # where every parameter and result is annotated, and the same on both implementations.
    for name in sorted(public_members(Comm)):
        fn = getattr(Comm, name, None)
        if not callable(fn):
            assert name in Comm.__annotations__ and name in cls.__annotations__, f"{cls.__name__}.{name}"
            continue
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        hints = getattr(cls, name).__annotations__
        assert set(hints) == {*params, "return"}, f"{cls.__name__}.{name} lacks annotations"
        assert hints == fn.__annotations__, f"{cls.__name__}.{name} is annotated unlike Comm.{name}"


def test_scatter_rows_without_parts_on_the_root_says_so():
    with pytest.raises(ValueError, match="root rank passed no parts"):
        SingleComm().scatter_rows(None)
