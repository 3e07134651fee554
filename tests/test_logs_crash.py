"""Crash safety: a capture process killed with SIGKILL leaves a readable log of its completed shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter
from usmoe_lp.logs.format import MANIFEST_NAME, shard_file

REPO = Path(__file__).resolve().parents[1]

# Writes 4 tokens every 10 ms into shards of 8 tokens, forever. Token i has logits
# a: 10*i + [0, 1, 2, 3] and b: -i + [0, 0.5, 1], token id 3*i, sequence i // 16, position i % 16.
# With SLOW_RENAME set, every shard waits 150 ms between its .tmp being written and its rename.
WRITER = """
import os, sys, time, torch
from usmoe_lp.logs import LayerInfo, RouterLogWriter
if os.environ.get("SLOW_RENAME"):
    real_replace = os.replace
    def slow_replace(src, dst):
        if str(src).endswith(".safetensors.tmp"):
            time.sleep(0.15)
        real_replace(src, dst)
    os.replace = slow_replace
w = RouterLogWriter(sys.argv[1], [LayerInfo("a", num_experts=4), LayerInfo("b", num_experts=3)], shard_tokens=8)
t = 0
while True:
    i = torch.arange(t, t + 4)
    w.append({"a": i[:, None].float() * 10 + torch.arange(4), "b": -i[:, None].float() + torch.arange(3) * 0.5},
             i * 3, i // 16, i % 16)
    t += 4
    time.sleep(0.01)
"""


def listed_shards(path: Path) -> int:
    try:
        return len(json.loads((path / MANIFEST_NAME).read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def run_and_kill(path: Path, slow_rename: bool, min_shards: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), **({"SLOW_RENAME": "1"} if slow_rename else {}))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the writer process exited early: {proc.stderr.read().decode()[-2000:]}")
            in_flight = any((path / "shards").glob("*.safetensors.tmp")) if slow_rename else True
            if listed_shards(path) >= min_shards and in_flight:
                break
            time.sleep(0.005)
        else:
            pytest.fail("the writer process did not write shards in 60 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def check_log_holds_completed_shards(path: Path) -> RouterLog:
    log = RouterLog.open(path, verify="full")
    report = log.validate()
    assert not log.complete and any("did not close" in w for w in report.warnings)
    n = len(log.shards)
    assert n >= 3 and log.num_tokens == 8 * n
    assert [s.file for s in log.shards] == [shard_file(i) for i in range(n)]
    on_disk = sorted(f"shards/{p.name}" for p in (path / "shards").glob("*.safetensors"))
    assert on_disk[:n] == [s.file for s in log.shards] and len(on_disk) <= n + 1   # at most one unlisted
    i = torch.arange(log.num_tokens)
    a = torch.cat([c.logits for c in log.iter_chunks("a", chunk_tokens=5)])
    assert torch.equal(a, i[:, None].float() * 10 + torch.arange(4))
    whole = log.read("b", 0, log.num_tokens)
    assert torch.equal(whole.logits, -i[:, None].float() + torch.arange(3) * 0.5)
    assert torch.equal(whole.token_ids, 3 * i) and torch.equal(whole.positions, i % 16)
    assert log.sequences.tolist() == sorted(set((i // 16).tolist()))
    return log


def test_sigkill_with_a_shard_in_flight_leaves_the_completed_shards(tmp_path):
    path = tmp_path / "log"
    run_and_kill(path, slow_rename=True, min_shards=3)
    log = check_log_holds_completed_shards(path)
    n = len(log.shards)
    tmp = path / (shard_file(n) + ".tmp")
    assert tmp.exists()                                          # the shard in flight at the kill ...
    assert not (path / shard_file(n)).exists()
    warnings = log.validate().warnings
    assert any(str(tmp) in w and "not part of the log" in w for w in warnings)   # ... is a warning, not an error


def test_sigkill_at_an_arbitrary_moment_leaves_a_valid_log(tmp_path):
    path = tmp_path / "log"
    run_and_kill(path, slow_rename=False, min_shards=4)
    check_log_holds_completed_shards(path)


def test_crash_between_rename_and_manifest_leaves_an_unlisted_shard(tmp_path, monkeypatch):
    logits = {"a": torch.randn(40, 4)}
    writer = RouterLogWriter(tmp_path / "log", [LayerInfo("a", num_experts=4)], shard_tokens=10)
    real = RouterLogWriter._write_manifest
    calls = []

    def dying_write_manifest(self):
        calls.append(1)
        if len(calls) == 3:          # shard 0 and shard 1 listed; die before listing shard 2
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(RouterLogWriter, "_write_manifest", dying_write_manifest)
    with pytest.raises(KeyboardInterrupt):
        writer.append(logits, torch.arange(40), torch.zeros(40, dtype=torch.long), torch.arange(40))
    assert (tmp_path / "log" / shard_file(2)).exists()
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.num_tokens == 20 and torch.equal(log.read("a", 0, 20).logits, logits["a"][:20])
    assert any(shard_file(2) in w and "does not list" in w for w in log.validate().warnings)
