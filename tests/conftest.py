"""Shared fixtures: one 2-worker local Dask cluster for every test of the distributed path; torch on one thread for a
module of small forwards."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dask_cluster_client():
    """A ``dask.distributed.Client`` of a 2-worker local cluster (processes, one thread each), started once per
    test session (about 10 s) and closed at its end. Results on it must equal the one-process path's."""
    from usmoe_lp.cluster import dask_client

    with dask_client(workers=2) as client:
        client.wait_for_workers(2, timeout=120)
        yield client


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """torch on one intra-op thread for a module of small forwards (one thread is faster than two contended
    ones); use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread_module")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
