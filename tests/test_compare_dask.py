"""``compare`` on a Dask cluster: the same agreement and side-by-side numbers as in one process (the oracle)."""

from __future__ import annotations

from test_compare import CHEAP, _logits, write

from usmoe_lp.compare import compare


def test_agreement_is_the_same_on_a_dask_cluster(tmp_path, dask_cluster_client):
    za = _logits(0)
    a, b = write(tmp_path / "a", za), write(tmp_path / "b", {"l0": za["l0"], "l1": _logits(1)["l1"]})
    result = compare([a, b], config=CHEAP)
    on_cluster = compare([a, b], config=CHEAP, client=dask_cluster_client)
    assert on_cluster.agreement_frame().equals(result.agreement_frame())
    assert on_cluster.side_by_side_frame().equals(result.side_by_side_frame())
    assert on_cluster.alignment == result.alignment
