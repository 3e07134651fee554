"""``analyze`` as tasks over token ranges: the same result whatever the cut and with or without a Dask cluster.

Oracles: the one-process run (the reports must be the same bytes on the 2-worker cluster), other cuts of the
same log (integers equal, floats within 1e-12 relative), a plain loop over the log's sequence ids for the
sample rule, and the brute-force definition of the cut (every token once, shards kept whole).
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.diagnostics import AnalyzeConfig, analyze
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import CorruptLog, LayerInfo, RouterLog, RouterLogWriter
from usmoe_lp.logs.format import shard_file
from usmoe_lp.report import write_analyze_report
from usmoe_lp.report.analyze_report import metrics_dict

A = importlib.import_module("usmoe_lp.diagnostics.analyze")  # the module (the package exports the function)

N, K, SHARD, CHUNK = 8, 2, 60, 30
CONFIG = dict(routers=("tc", "usmoe"), alphas=(0.5,), kbars=(2.0,), scopes=("sequence", "batch"),
              chunk_tokens=CHUNK, sequence_tokens=100, batch_size=2)


def _sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 4 sequences (lengths 23, 40, 17, 31), then decode steps interleaving sequences 4, 5 and 6
    (ids 4,5,6,4,5,6,... for 40 steps), then 5 more prompts of 37 tokens."""
    seq, pos = [], []
    for sid, length in enumerate((23, 40, 17, 31)):
        seq += [sid] * length
        pos += list(range(length))
    for step in range(40):
        for sid in (4, 5, 6):
            seq.append(sid)
            pos.append(step)
    for sid in range(7, 12):
        seq += [sid] * 37
        pos += list(range(37))
    return torch.tensor(seq), torch.tensor(pos)


def _write(path, seed: int = 0) -> None:
    seq, pos = _sequences()
    n = len(seq)
    g = torch.Generator().manual_seed(seed)
    infos = [LayerInfo(f"l{i}", num_experts=N, top_k=K, score_function="softmax") for i in range(2)]
    with RouterLogWriter(path, infos, shard_tokens=SHARD, dtype=torch.bfloat16, fsync=False) as w:
        logits = {i.name: torch.randn(N, generator=g) + torch.randn(n, N, generator=g) for i in infos}
        w.append(logits, token_ids=torch.arange(n), sequence_ids=seq, positions=pos)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask") / "log"
    _write(path)
    return path


@pytest.fixture(scope="module")
def one_process(log, tmp_path_factory):
    """The one-process result and its report (the reference)."""
    result = analyze(log, config=AnalyzeConfig(**CONFIG))
    out = tmp_path_factory.mktemp("rep") / "one"
    write_analyze_report(result, out)
    return result, out


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _compare(a, b, path="", rel=1e-12):
    """Integers (and strings, booleans) equal, floats within ``rel`` relative (an absolute floor of rel times the
    largest value of the same list, for entries that are round-off around zero)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _compare(a[key], b[key], f"{path}/{key}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        scale = max((abs(x) for x in a if isinstance(x, float) and math.isfinite(x)), default=0.0)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if isinstance(x, float) and isinstance(y, float) and math.isfinite(x):
                assert abs(x - y) <= rel * max(abs(x), abs(y), scale), f"{path}[{i}]: {x!r} vs {y!r}"
            else:
                _compare(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        assert abs(a - b) <= rel * max(abs(a), abs(b)), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} vs {b!r}"


# ----------------------------------------------------------------------------- the cut
def test_plan_ranges_covers_every_token_once_and_keeps_shards_whole():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        shards = list(itertools.pairwise(bounds))
        chunk, group, split = rng.randint(1, 9), rng.randint(1, 4), rng.randint(1, 6)
        ranges = A.plan_ranges(shards, chunk, group_chunks=group, split_chunks=split)
        assert [r.index for r in ranges] == list(range(len(ranges)))
        assert ranges[0].start == 0 and ranges[-1].stop == bounds[-1]
        assert all(r.start < r.stop for r in ranges)
        assert all(p.stop == q.start for p, q in itertools.pairwise(ranges))  # contiguous: every token once
        starts = {r.start for r in ranges} | {bounds[-1]}
        for a, b in shards:
            inside = sorted(s for s in starts if a < s < b)
            if b - a <= split * chunk:
                assert not inside, (shards, chunk, group, split)  # a shard up to split chunks is never cut
            else:
                assert inside == list(range(a + split * chunk, b, split * chunk))
        for r in ranges:  # a range of several shards holds at most group chunks
            whole = [(a, b) for a, b in shards if r.start <= a and b <= r.stop]
            if len(whole) > 1:
                assert r.num_tokens <= group * chunk


def test_chunk_bounds_follow_the_global_grid():
    assert A.chunk_bounds(0, 7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert A.chunk_bounds(4, 13, 4) == [(4, 8), (8, 12), (12, 13)]
    assert A.chunk_bounds(5, 6, 4) == [(5, 6)]


# ----------------------------------------------------------------------------- the sample
def _brute_force_sample(seq: list[int], budget: int) -> list[int]:
    """The first sequences by first appearance, whole, while fewer than ``budget`` tokens are taken."""
    order = list(dict.fromkeys(seq))
    taken, total = [], 0
    for sid in order:
        if total >= budget:
            break
        taken.append(sid)
        total += seq.count(sid)
    return taken


@pytest.mark.parametrize("budget", [1, 23, 24, 100, 150, 10_000])
def test_sample_is_the_first_whole_sequences_whatever_the_cut(log, monkeypatch, budget):
    seq = _sequences()[0].tolist()
    want = _brute_force_sample(seq, budget)
    cfg = AnalyzeConfig(**{**CONFIG, "sequence_tokens": budget})
    src = A._log_source(RouterLog.open(log), "lazy", str(log))
    for group, split in ((1, 1), (4, 16), (100, 100)):
        ranges = A.plan_ranges(src.shards, CHUNK, group_chunks=group, split_chunks=split)
        assert A._decide_sample(src, cfg, ranges, None).tolist() == want


def test_a_different_cut_gives_the_same_statistics(log, one_process, monkeypatch):
    """One task per shard, and every shard split in two, against the default grouping: integers equal, floats
    within 1e-12 (the chunks are the same rows; only the float64 merge order differs)."""
    ref, _ = one_process
    assert len(A.plan_ranges(A._log_source(RouterLog.open(log), "lazy", "").shards, CHUNK)) == 4  # 2 shards each
    want = metrics_dict(ref)
    for group, split in ((1, 16), (1, 1)):
        monkeypatch.setattr(A, "GROUP_CHUNKS", group)
        monkeypatch.setattr(A, "SPLIT_CHUNKS", split)
        other = analyze(log, config=AnalyzeConfig(**CONFIG))
        _compare(want, metrics_dict(other))
    for la in ref.layers:
        assert la.sample_tokens == sum(n for sid, n in _counts().items() if sid in {0, 1, 2, 3})


def _counts() -> dict[int, int]:
    seq = _sequences()[0].tolist()
    return {sid: seq.count(sid) for sid in dict.fromkeys(seq)}


# ----------------------------------------------------------------------------- the cluster
@pytest.mark.dask
def test_reports_are_the_same_bytes_on_the_cluster(log, one_process, dask_cluster_client, tmp_path):
    ref, ref_dir = one_process
    done = []
    result = analyze(log, config=AnalyzeConfig(**CONFIG), client=dask_cluster_client,
                     progress=lambda stage, d, t: done.append((stage, d, t)))
    write_analyze_report(result, tmp_path / "cluster")
    assert _files(tmp_path / "cluster") == _files(ref_dir)
    stream = [d for stage, d, _ in done if stage == "stream"]
    assert stream == sorted(stream) and stream[-1] == 2 * RouterLog.open(log).num_tokens  # tokens x layers
    assert [d for stage, d, _ in done if stage == "sample"] == [1, 2]


@pytest.mark.dask
def test_a_corrupted_shard_names_itself_on_the_cluster_as_in_one_process(log, dask_cluster_client, tmp_path):
    bad = tmp_path / "log"
    shutil.copytree(log, bad)
    shard = bad / shard_file(2)
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF  # a byte of the tensors' data: the header still parses, the checksum does not match
    shard.write_bytes(bytes(data))
    pattern = rf"{re.escape(str(shard))}: checksum mismatch"
    for client in (None, dask_cluster_client):
        with pytest.raises(CorruptLog, match=pattern):
            analyze(bad, config=AnalyzeConfig(**CONFIG), client=client)


@pytest.mark.dask
def test_cli_workers_and_scheduler_give_the_same_report(log, dask_cluster_client, tmp_path):
    """``usmoe-lp analyze LOG --scheduler ADDRESS`` (the session's cluster) and ``--workers 2`` (a fresh local
    cluster: the one test that starts its own) write the bytes of the one-process API's report (the streaming
    suite, to keep the test short)."""
    result = analyze(log, config=AnalyzeConfig(chunk_tokens=CHUNK, counterfactual=False, leakage=False))
    write_analyze_report(result, tmp_path / "api")
    args = ["analyze", str(log), "--chunk-tokens", str(CHUNK), "--no-counterfactual", "--no-leakage"]
    for name, flags in (("sched", ["--scheduler", dask_cluster_client.scheduler.address]),
                        ("w2", ["--workers", "2"])):
        res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / name), *flags])
        assert res.exit_code == 0, res.output
        assert _files(tmp_path / name) == _files(tmp_path / "api")


# ----------------------------------------------------------------------------- errors and paths
@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "0"], "--workers must be an integer >= 1"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "give at most one of --workers and --scheduler"),
    (["--scheduler", " "], "--scheduler must be the address of a Dask scheduler"),
])
def test_cli_cluster_flag_errors(log, tmp_path, flags, message):
    res = CliRunner().invoke(app, ["analyze", str(log), "--out", str(tmp_path / "o"), *flags])
    assert res.exit_code == 2
    assert message in res.output.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_file_urls_are_read_and_other_schemes_refused(log, tmp_path):
    cfg = AnalyzeConfig(counterfactual=False, leakage=False, chunk_tokens=CHUNK)
    a = analyze(log, config=cfg)
    b = analyze(log.as_uri(), config=cfg)
    assert b.source == str(log)
    assert [list(la.load.counts) for la in a.layers] == [list(la.load.counts) for la in b.layers]
    with pytest.raises(InvalidParameter, match=r"s3:// URL.*Mount the store .* or copy the log"):
        analyze("s3://bucket/run1/log", config=cfg)
    res = CliRunner().invoke(app, ["analyze", "gs://bucket/log", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "gs:// URL" in res.output
    with pytest.raises(InvalidParameter, match="client must be a dask.distributed.Client"):
        analyze(log, config=cfg, client="tcp://127.0.0.1:8786")
