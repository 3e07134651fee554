"""Shared fixtures: one 2-worker local Dask cluster for every test of the distributed path."""

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
