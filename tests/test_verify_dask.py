"""``usmoe-lp verify`` on a Dask cluster: the same records and report bytes as in one process.

The oracle is the one-process run of the same config; the batches are made small (``BATCH_ENTRIES``) so
that every matrix family x size x k is cut into several tasks, which the 2-worker cluster runs in any order.
"""

from __future__ import annotations

import pytest
from distributed import get_task_stream
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.report import write_verify_report
from usmoe_lp.verify import VerifyConfig, run_verify
from usmoe_lp.verify import runner as verify_runner

pytestmark = pytest.mark.dask

CONFIG = VerifyConfig(families=("gaussian", "student_t"), sizes=((4, 3), (6, 4)), ks=(1, 2), trials=3, seed=2,
                      backends=("closed_form", "highs"),
                      claims=("topc_optimal_le", "usmoe_ge_ec", "greedy_tc_eq_lp", "capped_greedy_optimal"))
CLI_ARGS = ["verify", "--families", "gaussian,student_t", "--sizes", "4x3,6x4", "--ks", "1,2", "--trials", "3",
            "--seed", "2", "--backends", "closed_form,highs",
            "--claims", "topc_optimal_le,usmoe_ge_ec,greedy_tc_eq_lp,capped_greedy_optimal", "--no-progress"]


@pytest.fixture
def small_batches(monkeypatch):
    """Two instances of 4x3 per task, one of 6x4: 2 x 2 x (2 + 3) = 20 tasks."""
    monkeypatch.setattr(verify_runner, "BATCH_ENTRIES", 24)
    assert len(verify_runner.verify_tasks(CONFIG)) == 20


def _files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.suffix == ".json"}


def test_report_is_the_same_bytes_with_and_without_the_cluster(dask_cluster_client, small_batches, tmp_path):
    alone = run_verify(CONFIG, progress=False)
    with get_task_stream(dask_cluster_client) as stream:
        spread = run_verify(CONFIG, progress=False, client=dask_cluster_client)
    keys = [t["key"] for t in stream.data]
    assert sum("usmoe-lp-verify" in str(k) for k in keys) == 20  # every batch ran on the workers
    assert any("usmoe-lp-shrink" in str(k) for k in keys)
    assert spread.records == alone.records
    assert [c.to_dict() for c in spread.counterexamples] == [c.to_dict() for c in alone.counterexamples]
    write_verify_report(alone, tmp_path / "alone")
    write_verify_report(spread, tmp_path / "cluster")
    a, b = _files(tmp_path / "alone"), _files(tmp_path / "cluster")
    assert "report.json" in a and any(name.startswith("counterexamples") for name in a)
    assert a == b
    assert any(not r.passed for r in alone.records)  # failures, hence shrinking, took part


def test_cli_scheduler_gives_the_report_of_one_process(dask_cluster_client, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, [*CLI_ARGS, "--out", str(tmp_path / "alone")])
    assert res.exit_code == 0, res.output
    address = dask_cluster_client.scheduler.address
    res = runner.invoke(app, [*CLI_ARGS, "--scheduler", address, "--out", str(tmp_path / "cluster")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "alone" / "report.json").read_bytes() == (tmp_path / "cluster" / "report.json").read_bytes()


def test_client_must_be_a_dask_client():
    with pytest.raises(InvalidParameter, match="client must be a dask.distributed.Client"):
        run_verify(CONFIG, progress=False, client="tcp://127.0.0.1:8786")
