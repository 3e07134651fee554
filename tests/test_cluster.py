"""usmoe_lp.cluster: the merge tree, ordered maps and reductions, in one process and on the session's cluster."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usmoe_lp.cluster import check_cluster, map_reduce, map_tasks, tree_merge, tree_order
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs.errors import CorruptLog


def level_by_level(parts):
    """The oracle: pair adjacent parts, level after level, the odd one carried up."""
    level = list(parts)
    while len(level) > 1:
        nxt = [f"({level[i]} {level[i + 1]})" for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@given(st.integers(1, 200))
def test_tree_is_the_level_by_level_pairing(n):
    assert tree_order(n) == level_by_level([str(i) for i in range(n)])


def test_tree_by_hand():
    assert tree_order(1) == "0"
    assert tree_order(3) == "((0 1) 2)"
    assert tree_order(6) == "(((0 1) (2 3)) (4 5))"


def _concat(a, b):
    return f"({a} {b})"


def _slow_str(i):
    time.sleep(0.05 * ((7 - i) % 4))  # later items often finish first
    return str(i)


def _fails_on_3(i):
    if i == 3:
        raise CorruptLog("shard-00003.safetensors: checksum mismatch")
    return i


@given(st.integers(1, 40))
def test_map_reduce_builds_the_same_tree_in_one_process(n):
    assert map_reduce(str, list(range(n)), _concat) == tree_order(n)


def test_empty_inputs_are_refused():
    with pytest.raises(InvalidParameter, match="nothing to merge"):
        tree_merge([])
    with pytest.raises(InvalidParameter, match="nothing to merge"):
        map_reduce(str, [], _concat)


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 0}, "integer >= 1"), ({"workers": True}, "integer >= 1"), ({"scheduler": " "}, "address"),
    ({"workers": 2, "scheduler": "tcp://x:1"}, "at most one"), ({"client": object()}, "dask.distributed.Client")])
def test_cluster_arguments_are_checked(kwargs, match):
    with pytest.raises(InvalidParameter, match=match):
        check_cluster(**kwargs)


def test_flag_names_in_errors():
    with pytest.raises(InvalidParameter, match="--workers and --scheduler"):
        check_cluster(workers=2, scheduler="tcp://x:1", names={"workers": "--workers", "scheduler": "--scheduler"})


@pytest.mark.dask
def test_on_the_cluster_order_and_tree_do_not_depend_on_completion_order(dask_cluster_client):
    seen = []
    items = list(range(11))
    assert map_tasks(_slow_str, items, client=dask_cluster_client, progress=lambda i, r: seen.append(i)) == \
        [str(i) for i in items]
    assert sorted(seen) == items
    assert map_reduce(_slow_str, items, _concat, client=dask_cluster_client) == tree_order(11)


@pytest.mark.dask
def test_a_task_error_comes_back_with_its_type_and_message(dask_cluster_client):
    with pytest.raises(CorruptLog, match="shard-00003"):
        map_tasks(_fails_on_3, list(range(6)), client=dask_cluster_client)
