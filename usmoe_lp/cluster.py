"""Scale-out on Dask: one place that turns ``--workers`` / ``--scheduler`` / a ``Client`` into a cluster,
maps tasks over it, and merges partial results in a fixed order.

``analyze`` maps token ranges of a router log to partial statistics and ``verify`` maps batches of
instances to trial records; both go through :func:`map_tasks` and :func:`tree_merge`, with or without a
cluster. Results never depend on the number of workers or on scheduling: the work is cut into the same
tasks either way (the cut depends on the data, not on the cluster), results come back in task order, and
partials are merged in one fixed binary tree over that order, so the floating-point sums are the same
bytes with 0, 1 or 16 workers.

Workers read router logs from the path they are given: on a multi-machine cluster that path must be on a
filesystem every worker sees (NFS, Lustre, a shared volume). A worker that dies is replaced and its task
retried by Dask; an error raised by a task (a corrupted shard, say) comes back as the same exception with
the same message as in one process.

>>> tree_merge([1, 2, 3, 4, 5], lambda a, b: a + b)
15
>>> tree_order(5)
'(((0 1) (2 3)) 4)'
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from usmoe_lp.errors import InvalidParameter, UsmoeLpError

__all__ = ["ClusterError", "check_cluster", "dask_client", "map_reduce", "map_tasks", "split_range", "tree_merge",
           "tree_order"]

T = TypeVar("T")
R = TypeVar("R")

RETRIES = 2
"""How often Dask reruns a task whose worker died (or that raised) before the error is final."""


class ClusterError(UsmoeLpError, RuntimeError):
    """The Dask cluster could not be started or reached, or lost a task for good."""


def check_cluster(workers: int | None = None, scheduler: str | None = None, client: Any = None, *,
                  names: dict[str, str] | None = None) -> None:
    """Validate the three ways to ask for a cluster before any work starts: at most one of them,
    ``workers`` an integer >= 1, ``scheduler`` a non-empty address, ``client`` a ``dask.distributed.Client``.
    ``names`` maps ``workers`` / ``scheduler`` / ``client`` to the words the caller's interface uses
    (CLI flags), so the error speaks the user's language."""
    names = {"workers": "workers", "scheduler": "scheduler", "client": "client", **(names or {})}
    given = [names[k] for k, v in (("workers", workers), ("scheduler", scheduler), ("client", client))
             if v is not None]
    if len(given) > 1:
        raise InvalidParameter(f"give at most one of {' and '.join(given)}: each names a whole cluster")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidParameter(f"{names['workers']} must be an integer >= 1 (local worker processes), "
                               f"got {workers!r}")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise InvalidParameter(f"{names['scheduler']} must be the address of a Dask scheduler "
                               f"(e.g. tcp://10.0.0.5:8786), got {scheduler!r}")
    if client is not None:
        from distributed import Client

        if not isinstance(client, Client):
            raise InvalidParameter(f"{names['client']} must be a dask.distributed.Client, "
                                   f"got {type(client).__name__}")


@contextlib.contextmanager
def dask_client(*, workers: int | None = None, scheduler: str | None = None, client: Any = None,
                names: dict[str, str] | None = None) -> Iterator[Any]:
    """The Dask client to run on, or None for one process (none of the three given).

    workers: start a local cluster of that many worker processes, one thread each (torch, BLAS and
    OpenMP on one thread per worker: the workers are the parallelism), closed on exit.
    scheduler: connect to a running ``dask.distributed`` scheduler at that address (closed on exit; the
    cluster itself is left running). client: a ``dask.distributed.Client`` of the caller's, used as is and
    left open.
    """
    check_cluster(workers, scheduler, client, names=names)
    if client is not None:
        yield client
        return
    if workers is None and scheduler is None:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        try:
            if workers is not None:
                # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 on its workers: on the analysis (chunks of tens
                # of MB allocated and freed) that roughly doubled page faults and system time, ~60% more CPU per
                # worker than one process; glibc thresholds of 256 / 64 MiB keep the chunks' pages mapped.
                stack.enter_context(dask.config.set({
                    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 268435456,
                    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 67108864}))
                cluster = stack.enter_context(LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    scheduler_kwargs={"dashboard": False}, silence_logs=logging.CRITICAL))
                c = stack.enter_context(Client(cluster))
            else:
                c = stack.enter_context(Client(scheduler, timeout="30s"))
        except (OSError, TimeoutError, RuntimeError) as exc:  # RuntimeError: "Nanny failed to start"
            where = f"a local cluster of {workers} workers" if workers is not None else f"scheduler {scheduler}"
            hint = ("; a script that starts local workers needs `if __name__ == \"__main__\":` around its main code"
                    if isinstance(exc, RuntimeError) and workers is not None else "")
            raise ClusterError(f"could not start or reach {where}: {exc}{hint}") from None
        yield c


def map_tasks(fn: Callable[[T], R], items: Sequence[T], *, client: Any = None,
              progress: Callable[[int, R], None] | None = None, key: str = "usmoe-lp") -> list[R]:
    """``[fn(item) for item in items]``, in item order; on ``client``'s workers when given.

    fn: a module-level function (it travels to the workers by reference). progress: called on the caller's
    thread as ``progress(index, result)`` for each finished task, in completion order. A task that raises
    re-raises here with its own type and message; the others are cancelled. Tasks whose worker died are
    retried :data:`RETRIES` times by Dask; a task raising a :class:`~usmoe_lp.errors.UsmoeLpError` is not
    retried (it would fail the same way).
    """
    results: list[Any] = [None] * len(items)
    for i, r in _finished(fn, items, client, progress, key):
        results[i] = r
    return results


def map_reduce(fn: Callable[[T], R], items: Sequence[T], merge: Callable[[R, R], R] | None = None, *,
               client: Any = None, progress: Callable[[int, R], None] | None = None,
               key: str = "usmoe-lp") -> R:
    """``tree_merge(map_tasks(fn, items, ...), merge)``, merging as results arrive: the same tree and the same
    bytes, but the caller holds only the results that wait for an earlier one plus O(log n) merged partials,
    not all n (what bounds the driver's memory on a long log). ``items`` must not be empty."""
    if not items:
        raise InvalidParameter("nothing to merge: no tasks")
    tree = _OrderedTree(merge)
    waiting: dict[int, Any] = {}
    for i, r in _finished(fn, items, client, progress, key):
        waiting[i] = r
        while tree.count in waiting:
            tree.push(waiting.pop(tree.count))
    return tree.result()


def _finished(fn, items, client, progress, key) -> Iterator[tuple[int, Any]]:
    """(index, result) of each task as it finishes (in item order without a client)."""
    if client is None:
        for i, item in enumerate(items):
            r = fn(item)
            if progress is not None:
                progress(i, r)
            yield i, r
        return
    from distributed import as_completed

    items = list(items)
    futures = client.map(_guarded, [fn] * len(items), items,
                         key=[f"{key}-{i}-{_token()}" for i in range(len(items))], retries=RETRIES, pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the task's own exception
            if fut.status == "cancelled":
                raise ClusterError(f"task {fut.key} was cancelled (its worker or the scheduler went away)")
            i = index[fut.key]
            ok, value = fut.result()
            if not ok:
                raise value  # a usmoe-lp error (bad input, a corrupted shard): final, never retried
            fut.release()
            if progress is not None:
                progress(i, value)
            yield i, value
    except BaseException:
        client.cancel(futures)
        raise


def _guarded(fn, item):
    """Run one task on a worker; a :class:`UsmoeLpError` comes back as a value, so Dask does not retry
    what would fail again (retries are for workers that died)."""
    try:
        return True, fn(item)
    except UsmoeLpError as exc:
        return False, exc


def _token() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


class _OrderedTree:
    """The merge tree of :func:`tree_merge`, built from parts pushed in index order.

    A binary counter: equal-sized neighbours merge at once (blocks of 1, 2, 4, ... parts, left to right), and
    what remains (blocks of decreasing size) is folded from the right. This is the tree of pairing adjacent
    parts level by level with the odd one carried up, written so that it needs only O(log n) partials."""

    def __init__(self, merge: Callable[[Any, Any], Any] | None = None) -> None:
        self.merge = merge or (lambda a, b: a.merge(b))
        self.stack: list[tuple[int, Any]] = []
        self.count = 0

    def push(self, value: Any) -> None:
        self.stack.append((1, value))
        self.count += 1
        while len(self.stack) >= 2 and self.stack[-1][0] == self.stack[-2][0]:
            size, right = self.stack.pop()
            _, left = self.stack.pop()
            self.stack.append((2 * size, self.merge(left, right)))

    def result(self) -> Any:
        if not self.stack:
            raise InvalidParameter("nothing to merge: no partial results")
        _, acc = self.stack[-1]
        for _, left in reversed(self.stack[:-1]):
            acc = self.merge(left, acc)
        return acc


def tree_merge(parts: Sequence[T], merge: Callable[[T, T], T] | None = None) -> T:
    """Merge ``parts`` pairwise in one fixed balanced tree over their order (see :func:`tree_order`):
    adjacent pairs, then pairs of pairs, the odd one out carried up. Only the order of ``parts`` decides
    which sums are formed, so floating-point results are reproducible bit for bit.

    merge: ``merge(a, b) -> new`` (default ``a.merge(b)``, the partial protocol of
    :mod:`usmoe_lp.diagnostics.partial`); ``parts`` must not be empty.
    """
    tree = _OrderedTree(merge)
    for part in parts:
        tree.push(part)
    return tree.result()


def tree_order(n: int) -> str:
    """The merge tree of :func:`tree_merge` over ``n`` parts, written out (for documentation and tests)."""
    return tree_merge([str(i) for i in range(n)], lambda a, b: f"({a} {b})")


def split_range(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into consecutive ranges of ``size`` (the last may be shorter)."""
    if size < 1:
        raise InvalidParameter(f"range size must be >= 1, got {size}")
    return [(a, min(a + size, stop)) for a in range(start, stop, size)] or [(start, start)]
