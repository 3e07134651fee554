"""A real capture process (capture(...).run(...) on a tiny Mixtral) killed with SIGKILL after a few shards
leaves a log that opens and validates and holds exactly its complete shards, equal to a fresh forward."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_capture_api import batch, mixtral

from usmoe_lp.logs import RouterLog

REPO = Path(__file__).resolve().parents[1]
SHARD = 10  # tokens per shard; each batch has 2 * 8 - 3 = 13 real tokens
KILL_AFTER = 3  # shards

# Captures batch(seed=i) for i = 0, 1, 2, ... (forever) and prints "shard <k>" once shard k is on disk:
# run() asks the generator for the next batch only after the previous forward (and its shard writes) returned.
CHILD = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from test_capture_api import batch, mixtral
from usmoe_lp.logs.capture import capture

torch.set_num_threads(1)
model = mixtral()
shard, done = int(sys.argv[3]), 0

def batches():
    global done
    tokens, i = 0, 0
    while True:
        b = batch(seed=i)
        yield b
        tokens += int(b["attention_mask"].sum())
        i += 1
        while done < tokens // shard:
            done += 1
            print("shard", done, flush=True)

with capture(model, sys.argv[1], shard_tokens=shard) as cap:
    cap.run(batches())
"""


def test_sigkilled_capture_leaves_complete_shards(tmp_path):
    out = tmp_path / "log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(REPO / "tests"), str(SHARD)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        seen = 0
        while seen < KILL_AFTER:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"the capture process exited early: {proc.stderr.read()[-2000:]}")
            assert line.startswith("shard"), line
            seen += 1
            assert time.monotonic() < deadline, "the capture process is too slow"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    log = RouterLog.open(out, verify="full")
    report = log.validate()
    assert report.ok, report
    assert not log.complete  # killed: never marked complete
    n_shards = len(log.shards)
    assert n_shards >= KILL_AFTER
    assert all(s.token_stop - s.token_start == SHARD for s in log.shards)  # only complete shards
    assert log.num_tokens == n_shards * SHARD

    # a fresh forward of the same batches gives the same logits and metadata
    model = mixtral()
    n_batches = -(-log.num_tokens // 13)
    refs, ids, seqs, pos = None, [], [], []
    for i in range(n_batches):
        inputs = batch(seed=i)
        with torch.no_grad():
            router_logits = model(**inputs, output_router_logits=True).router_logits
        keep = inputs["attention_mask"].reshape(-1).bool()
        layers = [r.reshape(-1, r.shape[-1])[keep] for r in router_logits]
        refs = layers if refs is None else [torch.cat([a, b]) for a, b in zip(refs, layers, strict=True)]
        ids.append(inputs["input_ids"].reshape(-1)[keep])
        mask = inputs["attention_mask"]
        seqs.append((2 * i + torch.arange(2)).unsqueeze(1).expand(2, 8).reshape(-1)[keep])
        pos.append((torch.cumsum(mask, 1) - 1).reshape(-1)[keep])
    n = log.num_tokens
    for name, ref in zip(log.layers, refs, strict=True):
        chunk = log.read(name, 0, n)
        torch.testing.assert_close(chunk.logits, ref[:n], atol=1e-6, rtol=1e-6)
    chunk = log.read(log.layers[0], 0, n)
    assert torch.equal(chunk.token_ids, torch.cat(ids)[:n])
    assert torch.equal(chunk.sequence_ids, torch.cat(seqs)[:n])
    assert torch.equal(chunk.positions, torch.cat(pos)[:n])
