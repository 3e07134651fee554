"""Routing patterns in ``analyze``'s streaming pass: per layer (PatternStream) and between consecutive layers
(TransitionPartial), on logits logs and selection logs, with domain labels, through the CLI.

Oracles: the selection ranked here independently (a stable argsort of the float64 logits: softmax is monotonic)
or the recorded ids, fed to each partial in ONE update over the whole layer — the driver's chunks, int16 ids of
the previous layer, range tasks and merge tree must give the same integer statistics; ``Routed.from_mask`` for the
ranking helper; another cut of the log gives the same bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.diagnostics import AnalyzeConfig, analyze
from usmoe_lp.diagnostics.analyze import domain_labels
from usmoe_lp.diagnostics.patterns import PatternStream
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.stream import ranked_selection
from usmoe_lp.diagnostics.transitions import TransitionPartial
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import LayerInfo, RouterLogWriter
from usmoe_lp.report.analyze_report import metrics_dict

N, K = 8, 3
FAST = dict(counterfactual=False, leakage=False, threads=False)


def _sequences():
    """Two prompts (37, 50 tokens), then sequences 2 and 3 interleaved for 30 steps, then a prompt of 41."""
    seq, pos = [0] * 37 + [1] * 50, list(range(37)) + list(range(50))
    for step in range(30):
        seq += [2, 3]
        pos += [step, step]
    seq += [4] * 41
    pos += list(range(41))
    return np.array(seq), np.array(pos)


def _oracle(ranked: dict[str, np.ndarray], meta: dict, names: tuple[str, ...] | None = None, domains=None):
    """Per layer a PatternStream fed once with the whole layer, and the transitions of consecutive layers."""
    routed = {lay: Routed(r, N, domains=domains, **meta) for lay, r in ranked.items()}
    out = {}
    for lay, r in routed.items():
        s = PatternStream.empty(N, K, domain_names=names)
        s.update(r)
        out[lay] = s.result()
    layers = list(routed)
    trans = {}
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        t = TransitionPartial.empty(N, N)
        t.update(routed[a], routed[b])
        trans[(a, b)] = t.result()
    return out, trans


def _same(got, want) -> None:
    for la in got.layers:
        g, w = la.patterns.to_json(matrices=True), want[0][la.layer].to_json(matrices=True)
        assert g == w, la.layer
    assert list(got.transitions) == list(want[1])
    for pair, t in got.transitions.items():
        assert t.to_dict(matrices=True) == want[1][pair].to_dict(matrices=True), pair


@pytest.fixture(scope="module")
def logits_log(tmp_path_factory):
    seq, pos = _sequences()
    n = seq.size
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, 12, (n,), generator=g)
    names = ("l0", "l1", "l2")
    logits = {lay: (torch.randn(N, generator=g) + torch.randn(n, N, generator=g)).double() for lay in names}
    path = tmp_path_factory.mktemp("logits") / "log"
    with RouterLogWriter(path, [LayerInfo(lay, num_experts=N, top_k=K, score_function="softmax") for lay in names],
                         shard_tokens=45, dtype=torch.float32, fsync=False) as w:
        w.append({k: v.float() for k, v in logits.items()}, token_ids=tok, sequence_ids=seq, positions=pos)
    # the model's top-k, best first: softmax is monotonic in the logits; ties are absent from random float32 logits
    ranked = {lay: np.argsort(-z.float().double().numpy(), axis=1, kind="stable")[:, :K] for lay, z in logits.items()}
    meta = dict(token_ids=tok.numpy(), sequence_ids=seq, positions=pos)
    return path, ranked, meta


def test_logits_log_patterns_equal_one_pass_oracle(logits_log):
    path, ranked, meta = logits_log
    got = analyze(path, config=AnalyzeConfig(chunk_tokens=16, **FAST))  # 4 tasks, chunks cut mid-sequence
    _same(got, _oracle(ranked, meta))
    assert got.layers[0].patterns.locality.sequences == 5


def test_patterns_do_not_depend_on_the_cut(logits_log):
    path, _, _ = logits_log
    a = analyze(path, config=AnalyzeConfig(chunk_tokens=16, **FAST))
    b = analyze(path, config=AnalyzeConfig(chunk_tokens=1000, **FAST))
    pa, pb = ({lay: m["patterns"] for lay, m in metrics_dict(r)["layers"].items()} for r in (a, b))
    assert json.dumps(pa) == json.dumps(pb)  # the float statistics of the suite move with the cut; these do not
    assert json.dumps(metrics_dict(a)["layer_transition_mi"]) == json.dumps(metrics_dict(b)["layer_transition_mi"])


def test_patterns_off_changes_nothing_else(logits_log):
    path, _, _ = logits_log
    on = metrics_dict(analyze(path, config=AnalyzeConfig(chunk_tokens=32, **FAST)))
    off = metrics_dict(analyze(path, config=AnalyzeConfig(chunk_tokens=32, patterns=False, **FAST)))
    assert "layer_transition_mi" not in off and all("patterns" not in la for la in off["layers"].values())
    for la in on["layers"].values():
        del la["patterns"]
    del on["layer_transition_mi"]
    on["config"]["patterns"] = False
    on.pop("library_versions"), off.pop("library_versions")
    assert on == off


def test_selection_log_patterns_in_the_recorded_order_with_domains(tmp_path):
    """A selection log: ids in their recorded order (not sorted), -1 slots, a sequence without a label."""
    seq, pos = _sequences()
    n = seq.size
    g = np.random.default_rng(5)
    sel = {lay: np.stack([g.permutation(N)[:K] for _ in range(n)]).astype(np.int32) for lay in ("a", "b")}
    sel["a"][4, 2] = -1
    sel["b"][9] = -1
    tok = g.integers(-1, 6, n)
    path = tmp_path / "log"
    with RouterLogWriter(path, [LayerInfo(lay, num_experts=N, top_k=K) for lay in sel], content="selection",
                         shard_tokens=40, fsync=False) as w:
        w.append(None, token_ids=tok, sequence_ids=seq, positions=pos, selected=sel)
    labels = {0: "web", 1: "code", 3: "web", 4: "code", 99: "math"}  # 2 unlabelled; 99 is not in the log
    got = analyze(path, config=AnalyzeConfig(chunk_tokens=16), domains=labels)
    d = domain_labels(labels)
    want = _oracle({k: v.astype(np.int64) for k, v in sel.items()},
                   dict(token_ids=tok, sequence_ids=seq, positions=pos), d.names, d.of(seq))
    _same(got, want)
    dom = got.layers[0].patterns.domain
    assert dom.domain_names == ("code", "math", "web") and dom.unlabelled_tokens == int((seq == 2).sum())
    assert got.layers[0].patterns.vocab.unknown_tokens == int((tok == -1).sum())


def test_captured_ids_keep_their_order_in_a_logits_log(tmp_path):
    """Captured (n, k) ids in a logits log are ranked as recorded (the LRU order within a token counts)."""
    seq, pos = _sequences()
    n = seq.size
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, N, generator=g)
    top = torch.topk(z, K, dim=-1).indices
    recorded = top.flip(1)  # worst first: a different rank order than the scores'
    path = tmp_path / "log"
    with RouterLogWriter(path, [LayerInfo("a", num_experts=N, top_k=K, score_function="softmax")],
                         shard_tokens=50, dtype=torch.float32, fsync=False) as w:
        w.append({"a": z}, token_ids=torch.arange(n) % 7, sequence_ids=seq, positions=pos, selected={"a": recorded})
    got = analyze(path, config=AnalyzeConfig(chunk_tokens=32, **FAST))
    meta = dict(token_ids=np.arange(n) % 7, sequence_ids=seq, positions=pos)
    _same(got, _oracle({"a": recorded.numpy()}, meta))
    by_score = _oracle({"a": top.numpy()}, meta)[0]["a"]
    assert got.layers[0].patterns.vocab.to_dict() != by_score.vocab.to_dict()  # top-1 = the recorded first


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_ranked_selection_is_from_mask(n, n_exp, seed, fixed, ties):
    g = np.random.default_rng(seed)
    if fixed:
        k = int(g.integers(0, n_exp + 1))
        mask = np.zeros((n, n_exp), dtype=bool)
        for row in mask:
            row[g.permutation(n_exp)[:k]] = True
    else:
        mask = g.random((n, n_exp)) < 0.5
    scores = g.integers(0, 3, (n, n_exp)).astype(np.float32) if ties else g.random((n, n_exp)).astype(np.float32)
    meta = dict(token_ids=[0] * n, sequence_ids=list(range(n)), positions=[0] * n)
    for s in (scores, None):
        want = Routed.from_mask(mask, s, **meta).ranked
        got = Routed(ranked_selection(mask, s), n_exp, **meta).ranked
        np.testing.assert_array_equal(got, want)


def test_domain_labels_are_checked():
    d = domain_labels({"2": "b", 0: "a", np.int64(5): "b"})
    assert d.names == ("a", "b") and d.of(np.array([5, 1, 0, 2])).tolist() == [1, -1, 0, 1]
    for bad, match in (({-1: "a"}, "not a sequence id"), ({"x": "a"}, "not a sequence id"),
                       ({1: ""}, "non-empty string"), ({1: 3}, "non-empty string"), ([1, 2], "must map")):
        with pytest.raises(InvalidParameter, match=match):
            domain_labels(bad)


def test_cli_domains_file_and_its_errors(logits_log, tmp_path):
    path, _, _ = logits_log
    runner = CliRunner()
    args = ["analyze", str(path), "--no-counterfactual", "--no-leakage", "--chunk-tokens", "64"]
    csv = tmp_path / "d.csv"
    csv.write_text("sequence_id,domain\n0,web\n1,code\n4,web\n")
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"0": "web", "1": "code", "4": "web"}))
    outs = []
    for i, f in enumerate((csv, js)):
        out = tmp_path / f"r{i}"
        run = runner.invoke(app, [*args, "--out", str(out), "--domains", str(f)])
        assert run.exit_code == 0, run.output
        outs.append(json.loads((out / "metrics.json").read_text()))
        assert (out / "domain_shares.png").is_file() and "Routing patterns" in (out / "report.md").read_text()
    dom = [o["layers"]["l0"]["patterns"]["domain_specialisation"] for o in outs]
    assert dom[0] == dom[1] and dom[0]["domain_names"] == ["code", "web"] and dom[0]["unlabelled_tokens"] == 60
    for text, match in (("seq,dom\n0,a\n", "header is sequence_id,domain"), ("sequence_id,domain\nx,a\n", "'x'"),
                        ("sequence_id,domain\n1,a\n1,b\n", "labelled twice"), ('{"0": 1', "not valid JSON"),
                        ('{"0": ""}', "non-empty")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        run = runner.invoke(app, [*args, "--out", str(tmp_path / "never"), "--domains", str(bad)])
        assert run.exit_code != 0 and "--domains" in run.output and match in run.output, (text, run.output)
        assert not (tmp_path / "never").exists()
