"""``usmoe_lp.compare``: routing agreement token by token, and the side-by-side analyses.

Oracles: a plain loop over tokens with Python sets (the agreement), the top-k of the logits sorted in Python
(the model's selection of a softmax layer without recorded semantics: softmax is monotone), the expert
permutation of a twin log (relabelled top-1 agreement 1, permutation-invariant load metrics equal),
``analyze`` run on each log alone (the side-by-side numbers), and random cuts of the token stream (the
partials merge exactly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usmoe_lp.compare import AgreementPartial, chunk_selection, compare, match_layers
from usmoe_lp.diagnostics import AnalyzeConfig, analyze
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter
from usmoe_lp.logs.reader import Chunk

N, K, T, SHARD = 8, 2, 90, 25
CHEAP = AnalyzeConfig(counterfactual=False, leakage=False, chunk_tokens=16, threads=False)


def _meta(n: int = T):
    """Sequences of 15 tokens; token ids known except every 7th (-1)."""
    seq = torch.arange(n) // 15
    pos = torch.arange(n) % 15
    tok = (torch.arange(n) * 13) % 50
    tok[::7] = -1
    return tok, seq, pos


def _logits(seed: int, n: int = T, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(n, N, generator=g) * 2 for i in range(layers)}


def write(path, logits: dict[str, torch.Tensor], meta=None, names=None):
    """A logits log of ``logits`` (layer -> (n, N)), softmax, top-k K, shards of SHARD tokens."""
    names = names or list(logits)
    n = next(iter(logits.values())).shape[0]
    tok, seq, pos = meta if meta is not None else _meta(n)
    infos = [LayerInfo(nm, num_experts=N, top_k=K, score_function="softmax") for nm in names]
    with RouterLogWriter(path, infos, shard_tokens=SHARD, fsync=False) as w:
        w.append(dict(zip(names, logits.values(), strict=True)), token_ids=tok, sequence_ids=seq, positions=pos)
    return path


def _topk_sets(z: torch.Tensor) -> list[list[int]]:
    """Each row's experts by descending logit, ties to the lowest index (Python sort), first K."""
    return [sorted(range(N), key=lambda e, row=row: (-row[e], e))[:K] for row in z.tolist()]


def oracle(za: torch.Tensor, zb: torch.Tensor) -> dict[str, float]:
    """Agreement of the top-K routings of two logit matrices, by a loop over tokens."""
    ra, rb = _topk_sets(za), _topk_sets(zb)
    n = len(ra)
    exact = sum(set(a) == set(b) for a, b in zip(ra, rb, strict=True)) / n
    jac = sum(len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(ra, rb, strict=True)) / n
    top1 = sum(a[0] == b[0] for a, b in zip(ra, rb, strict=True)) / n
    overlap = sum(len(set(a) & set(b)) for a, b in zip(ra, rb, strict=True)) / (n * K)
    return {"exact_agreement": exact, "jaccard": jac, "top1_agreement": top1, "overlap": overlap,
            "fluctuation": 1 - top1}


def _row(result, layer, a="a", b="b"):
    f = result.agreement_frame()
    return f[(f["layer"] == layer) & (f["a"] == a) & (f["b"] == b)].iloc[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Logs a and b: layer l0 the same logits, l1 perturbed in b."""
    root = tmp_path_factory.mktemp("cmp")
    za = _logits(0)
    zb = {"l0": za["l0"].clone(), "l1": za["l1"] + torch.randn(T, N, generator=torch.Generator().manual_seed(9))}
    a, b = write(root / "a", za), write(root / "b", zb)
    return a, b, za, zb, compare([a, b], config=CHEAP)


def test_agreement_matches_a_loop_over_tokens(pair):
    _, _, za, zb, result = pair
    assert result.alignment.shared and result.alignment.tokens == T
    assert result.alignment.token_ids_checked == T - len(range(0, T, 7))
    for layer in ("l0", "l1"):
        expected = oracle(za[layer], zb[layer])
        got = _row(result, layer)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (layer, key)
        assert got["tokens"] == T


def test_a_layer_perturbed_in_one_log_disagrees_only_there(pair):
    result = pair[4]
    same = _row(result, "l0")
    assert (same["exact_agreement"], same["jaccard"], same["top1_agreement"], same["overlap"]) == (1, 1, 1, 1)
    assert same["fluctuation"] == 0
    assert _row(result, "l1")["exact_agreement"] < 0.9
    pooled = _row(result, "pooled")
    expected = (oracle(pair[2]["l0"], pair[3]["l0"])["exact_agreement"]
                + oracle(pair[2]["l1"], pair[3]["l1"])["exact_agreement"]) / 2
    assert pooled["exact_agreement"] == pytest.approx(expected) and pooled["tokens"] == 2 * T


def test_logs_written_with_the_same_logits_agree_fully(tmp_path):
    z = _logits(3)
    result = compare([write(tmp_path / "x", z), write(tmp_path / "y", z)], config=CHEAP)
    f = result.agreement_frame()
    for col in ("exact_agreement", "jaccard", "top1_agreement", "overlap", "matched_top1_agreement"):
        assert (f[col] == 1.0).all(), col
    assert (f["fluctuation"] == 0.0).all()
    assert result.labels == ("x", "y") and result.matched_by == "name"


def test_a_permuted_expert_twin(tmp_path):
    z = _logits(4)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    twin = {k: v[:, perm] for k, v in z.items()}  # twin expert j is the original's perm[j]
    result = compare([write(tmp_path / "a", z), write(tmp_path / "b", twin)], config=CHEAP)
    for layer in z:
        got, expected = _row(result, layer), oracle(z[layer], twin[layer])
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12)
        assert got["matched_top1_agreement"] == 1.0  # relabelling the experts undoes the permutation
        assert got["top1_agreement"] < 0.5
    side = result.side_by_side_frame().set_index(["layer", "log"])
    for col in ("load_entropy", "token_entropy", "maxvio", "gini", "cv", "aux_loss", "mean_margin"):
        for layer in z:
            assert side.loc[(layer, "a"), col] == pytest.approx(side.loc[(layer, "b"), col], rel=1e-5), col


def test_side_by_side_equals_analyze_on_each_log(pair):
    a, b, _, _, result = pair
    side = result.side_by_side_frame()
    for label, path in (("a", a), ("b", b)):
        alone = analyze(path, config=CHEAP)
        expected = alone.load_frame().merge(alone.collapse_frame(), on="layer").set_index("layer")
        mine = side[side["log"] == label].set_index("layer")
        for layer in alone.layer_names:
            for col in expected.columns:
                want, got = expected.loc[layer, col], mine.loc[layer, col]
                assert (np.isnan(want) and np.isnan(got)) if isinstance(want, float) and np.isnan(want) else \
                    want == got, (label, layer, col)


def test_tokens_that_differ_give_no_agreement_and_the_first_is_named(tmp_path, pair):
    a = pair[0]
    tok, seq, pos = _meta()
    tok = tok.clone()
    tok[38] = 49  # token 38's id (known in a) differs
    other = write(tmp_path / "other", _logits(5), meta=(tok, seq, pos))
    result = compare([a, other], config=CHEAP)
    assert not result.alignment.shared and result.agreement == ()
    assert "token 38 differs" in result.alignment.reason and "token id 49" in result.alignment.reason
    assert result.agreement_frame().empty
    assert len(result.side_by_side_frame()) == 4  # the side-by-side table is still there

    short = write(tmp_path / "short", _logits(5, n=60))
    result = compare([a, short], config=CHEAP)
    assert not result.alignment.shared
    assert "different numbers of tokens (a: 90, short: 60)" in result.alignment.reason
    assert "first 60 tokens match" in result.alignment.reason

    tok, seq, pos = _meta()
    shifted = write(tmp_path / "shifted", _logits(5), meta=(tok, seq + 1, pos))
    reason = compare([a, shifted], config=CHEAP).alignment.reason
    assert reason.startswith("token 0 differs: a has sequence 0") and "shifted has sequence 1" in reason


def test_unknown_token_ids_match_on_sequence_and_position(tmp_path, pair):
    a, _, za, _, _ = pair
    tok, seq, pos = _meta()
    blind = write(tmp_path / "blind", za, meta=(torch.full_like(tok, -1), seq, pos))
    result = compare([a, blind], config=CHEAP)
    assert result.alignment.shared and result.alignment.token_ids_checked == 0
    assert (result.agreement_frame()["exact_agreement"] == 1.0).all()


def test_selection_only_log_against_its_logits_log(tmp_path, pair):
    a, _, za, _, _ = pair
    tok, seq, pos = _meta()
    infos = [LayerInfo(n, num_experts=N, top_k=K) for n in za]
    sel = {n: torch.tensor(_topk_sets(z)) for n, z in za.items()}  # best first
    with RouterLogWriter(tmp_path / "sel", infos, content="selection", shard_tokens=SHARD, fsync=False) as w:
        w.append(None, token_ids=tok, sequence_ids=seq, positions=pos, selected=sel)
    assert not RouterLog.open(tmp_path / "sel").has_logits
    result = compare([a, tmp_path / "sel"], config=CHEAP)
    f = result.agreement_frame()
    assert (f["exact_agreement"] == 1.0).all() and (f["top1_agreement"] == 1.0).all()
    assert result.contents == ("logits", "selection")
    assert "collapse" in result.analyses[1].unavailable and not result.analyses[0].unavailable
    side = result.side_by_side_frame().set_index(["layer", "log"])
    alone = analyze(a, config=CHEAP)
    for la in alone.layers:
        assert side.loc[(la.layer, "sel"), "load_entropy"] == la.load.entropy
        assert side.loc[(la.layer, "sel"), "gini"] == la.load.gini
        np.testing.assert_array_equal(result.analyses[1].layer(la.layer).load.counts, la.load.counts)
        assert np.isnan(side.loc[(la.layer, "sel"), "mean_margin"])  # no logits: no margins


def test_selection_top1_is_the_first_filled_slot():
    info = LayerInfo("l", num_experts=4, top_k=2)
    ids = torch.tensor([[2, 0], [-1, 3], [-1, -1]])
    zeros = torch.zeros(3, dtype=torch.long)
    chunk = Chunk(logits=None, token_ids=zeros, sequence_ids=zeros, positions=torch.arange(3), token_start=0,
                  selected=ids, layer="l")
    mask, top1 = chunk_selection(chunk, info, 2)
    assert top1.tolist() == [2, 3, -1]
    assert mask.tolist() == [[True, False, True, False], [False, False, False, True], [False] * 4]


def test_layers_match_by_order_when_names_differ(tmp_path, pair):
    a, _, za, _, _ = pair
    renamed = write(tmp_path / "renamed", za, names=["m0", "m1"])
    result = compare([a, renamed], config=CHEAP)
    assert result.matched_by == "order" and result.layers == (("l0", "m0"), ("l1", "m1"))
    assert (result.agreement_frame()["exact_agreement"] == 1.0).all()
    side = result.side_by_side_frame()
    assert side[side["log"] == "renamed"]["log_layer"].tolist() == ["m0", "m1"]
    only = compare([a, renamed], layers=["l1"], config=CHEAP)
    assert only.layers == (("l1", "m1"),)

    three = write(tmp_path / "three", _logits(6, layers=3))
    logs = [RouterLog.open(p) for p in (renamed, three)]
    with pytest.raises(InvalidParameter, match="cannot be matched.*renamed lacks l0, l1, l2.*three: 3, renamed: 2"):
        match_layers(logs[::-1], ("three", "renamed"))
    with pytest.raises(InvalidParameter, match="not a layer of a"):
        compare([a, renamed], layers=["m0"], config=CHEAP)


def test_three_logs_give_every_pair(tmp_path, pair):
    a, b, za, zb, _ = pair
    c = write(tmp_path / "c", _logits(7))
    result = compare([a, b, c], labels=["A", "B", "C"], layers=["l1"], config=CHEAP)
    assert result.pairs == (("A", "B"), ("A", "C"), ("B", "C"))
    assert _row(result, "l1", "A", "C")["jaccard"] == pytest.approx(oracle(za["l1"], _logits(7)["l1"])["jaccard"])
    assert _row(result, "l1", "A", "B")["jaccard"] == pytest.approx(oracle(za["l1"], zb["l1"])["jaccard"])


def test_bad_requests(pair, tmp_path):
    a, b = pair[0], pair[1]
    with pytest.raises(InvalidParameter, match="at least two router logs, got 1"):
        compare([a], config=CHEAP)
    with pytest.raises(InvalidParameter, match="labels: 3 given for 2 logs"):
        compare([a, b], labels=["x", "y", "z"], config=CHEAP)
    with pytest.raises(InvalidParameter, match="unique"):
        compare([a, b], labels=["x", "x"], config=CHEAP)
    with pytest.raises(InvalidParameter, match="layers is empty"):
        compare([a, b], layers=[], config=CHEAP)
    result = compare([a, a], config=CHEAP)  # the same path twice: labels numbered
    assert result.labels[0] != result.labels[1]


def _plain_counts(ma, ta, mb, tb):
    exact = sum(bool((x == y).all()) for x, y in zip(ma, mb, strict=True))
    inter = [int((x & y).sum()) for x, y in zip(ma, mb, strict=True)]
    union = [int((x | y).sum()) for x, y in zip(ma, mb, strict=True)]
    jac = sum(i / u if u else 1.0 for i, u in zip(inter, union, strict=True))
    return exact, sum(int(x == y) for x, y in zip(ta, tb, strict=True)), sum(inter), jac


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31 - 1), st.lists(st.integers(0, 60), max_size=4))
def test_partials_merge_exactly_whatever_the_cut(n, seed, cuts):
    rng = np.random.default_rng(seed)
    ma, mb = rng.random((n, 5)) < 0.4, rng.random((n, 5)) < 0.4
    ta = np.where(ma.any(1), ma.argmax(1), -1)
    tb = np.where(mb.any(1), mb.argmax(1), -1)
    bounds = sorted({0, n, *[c for c in cuts if c <= n]})
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        p = AgreementPartial.empty("l", "a", "b", 5, 5, 2, 2)
        p.update(ma[lo:hi], ta[lo:hi], mb[lo:hi], tb[lo:hi])
        parts.append(p)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    s = merged.result()
    exact, top1, overlap, jac = _plain_counts(ma, ta, mb, tb)
    assert (s.tokens, s.exact_tokens, s.top1_tokens, s.overlap_pairs) == (n, exact, top1, overlap)
    assert s.jaccard == pytest.approx(jac / n, abs=1e-12)
    pa = np.bincount(np.where(ta < 0, 5, ta), minlength=6) / n
    pb = np.bincount(np.where(tb < 0, 5, tb), minlength=6) / n
    assert s.top1_chance == pytest.approx(float(pa @ pb), abs=1e-12)

