"""The streaming pass of one layer (usmoe_lp.diagnostics.stream) against independent oracles.

* the model's selection: the registry's ``native`` router itself (``reroute(logits, "native")``) on the whole
  chunk, for every kind of routing semantics, on bf16 logits full of ties and near-ties;
* the statistics of :class:`LayerStream` (blocks of 8192 tokens, float32, one softmax): the one-shot public
  functions on float64 softmax probabilities (load_stats, margin_stats, collapse_stats), within the float32
  tolerances the partials document;
* the native agreement with a replay passed in: the partial re-routing by itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usmoe_lp.diagnostics.collapse import collapse_stats
from usmoe_lp.diagnostics.load import load_stats
from usmoe_lp.diagnostics.margins import margin_stats
from usmoe_lp.diagnostics.native import NativeAgreementPartial
from usmoe_lp.diagnostics.stream import (
    BLOCK_TOKENS,
    LayerStream,
    model_mask,
    native_selection,
    selection_scores,
    stream_scores,
)
from usmoe_lp.logs import LayerInfo
from usmoe_lp.logs.reader import Chunk
from usmoe_lp.routers import reroute
from usmoe_lp.routing import probabilities, token_choice

N, K = 8, 2
EPS = (1e-3, 1e-2, 5e-2)

SEMANTICS = {
    "softmax": LayerInfo("l", num_experts=N, top_k=K, score_function="softmax"),
    "softmax float32": LayerInfo("l", num_experts=N, top_k=K, score_function="softmax", score_dtype="float32"),
    "softmax bfloat16": LayerInfo("l", num_experts=N, top_k=K, score_function="softmax", score_dtype="bfloat16"),
    "logits": LayerInfo("l", num_experts=N, top_k=K, score_function="softmax_topk"),
    "sigmoid": LayerInfo("l", num_experts=N, top_k=K, score_function="sigmoid", score_dtype="float32"),
    "sigmoid bias groups": LayerInfo("l", num_experts=N, top_k=K, score_function="sigmoid",
                                     selection_bias=tuple(0.01 * i for i in range(N)), n_group=4, topk_group=2,
                                     group_score="top2_sum"),
    "softmax bias": LayerInfo("l", num_experts=N, top_k=K, score_function="softmax",
                              selection_bias=(0.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0)),
}


def _hard_logits(rows: int = 600, seed: int = 0) -> torch.Tensor:
    """bf16 logits with ties at the boundary (a grid of 1/4), near-ties one bf16 step apart at large
    magnitudes, rows far below their maximum (probabilities that underflow) and plain gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(-8, 8, (rows // 3, N), generator=g) / 4.0
    wide = 3.0 * torch.randn(rows // 3, N, generator=g)
    near = torch.full((rows - 2 * (rows // 3), N), 96.0)
    near[:, : K + 1] += torch.tensor([0.5, 0.5, 0.0])[: K + 1]  # a tie of the 2nd and 3rd at 96.5 vs 96
    near[::2, K] = 96.5  # k-th and (k+1)-th equal
    near[1::3, 1] = 97.0
    near[2::5] -= torch.tensor([0.0, 300.0, 0.0, 300.0, 0.0, 0.0, 0.0, 0.0])  # underflowing probabilities
    # the k-th and (k+1)-th probabilities underflow to 0 in float32, not in float64: 1 > 2 > 0, 3, ...
    under = torch.tensor([[0.0, -200.0, -202.0, -300.0, -300.0, -400.0, -250.0, -500.0]]).repeat(4, 1)
    return torch.cat([grid, wide, near, under]).to(torch.bfloat16)


def _chunk(z: torch.Tensor, selected=None) -> Chunk:
    n = z.shape[0]
    return Chunk(logits=z, token_ids=torch.zeros(n, dtype=torch.long), sequence_ids=torch.zeros(n, dtype=torch.long),
                 positions=torch.arange(n), token_start=0, selected=selected, layer="l")


@pytest.mark.parametrize("name", list(SEMANTICS))
def test_native_selection_is_reroute_native(name):
    info = SEMANTICS[name]
    z = _hard_logits()
    want = reroute(z, "native", k=K, layer=info).mask
    zf = z.float()
    probs = probabilities(zf, info.score_function)
    scores, tol = stream_scores(z, zf, probs, info)
    srt = np.sort(scores.numpy(), axis=1)
    got = native_selection(z, info, K, scores, srt, tol)
    assert torch.equal(got, want), name
    assert torch.equal(native_selection(z, info, K), want)  # no scores: native's top-k on every row
    exact = selection_scores(z, info)
    mask, source = model_mask(_chunk(z), exact, K, np.sort(exact.numpy(), axis=1), info)
    assert source == "recomputed native" and torch.equal(mask, want)


def test_stream_scores_tolerance_only_where_probabilities_stand_in():
    z = _hard_logits(30)
    zf = z.float()
    for name, info in SEMANTICS.items():
        probs = probabilities(zf, info.score_function)
        scores, tol = stream_scores(z, zf, probs, info)
        if name in ("softmax", "softmax float32"):
            assert scores is probs and tol > 0
            # within a few float32 steps of the softmax the model ranks (float64 where its dtype is unknown)
            np.testing.assert_allclose(scores.numpy(), selection_scores(z, info).numpy(), rtol=1e-5, atol=1e-30)
        else:
            assert tol == 0.0
            assert torch.equal(scores, selection_scores(z, info)), name


def _float64_reference(z64: np.ndarray, mask: np.ndarray, k: int):
    e = np.exp(z64 - z64.max(axis=1, keepdims=True))
    p64 = e / e.sum(axis=1, keepdims=True)
    return (load_stats(mask, p64, logits=z64, top_k=k), margin_stats(p64, k, EPS),
            collapse_stats(z64, p64))


def test_layer_stream_matches_float64_oracles():
    """Three blocks (20000 tokens), a common offset per token (softmax-invariant), bf16: every statistic of
    the stream against the float64 one-shot functions; integers exactly, floats to the documented float32
    tolerances."""
    g = torch.Generator().manual_seed(7)
    n = 2 * BLOCK_TOKENS + 3616
    z = (torch.randn(N, generator=g) + 4.0 * torch.randn(n, 1, generator=g)
         + 1.5 * torch.randn(n, N, generator=g)).to(torch.bfloat16)
    info = SEMANTICS["softmax"]
    stream = LayerStream.empty(info, K, EPS)
    mask = stream.update(_chunk(z))
    want = reroute(z, "native", k=K, layer=info).mask
    assert torch.equal(mask, want) and stream.source == "recomputed native" and stream.tokens == n
    res = stream.result()
    load, margins, collapse = _float64_reference(z.double().numpy(), want.numpy(), K)

    got = res["load"]
    np.testing.assert_array_equal(got.counts, load.counts)
    np.testing.assert_array_equal(got.experts_per_token, load.experts_per_token)
    for key in ("token_entropy", "mean_prob_entropy", "aux_loss", "z_loss", "importance_cv2", "gini"):
        assert getattr(got, key) == pytest.approx(getattr(load, key), rel=1e-6), key

    got = res["margins"]
    assert (got.num_tokens, got.boundary_tokens) == (margins.num_tokens, margins.boundary_tokens)
    assert got.mean_margin == pytest.approx(margins.mean_margin, rel=1e-5)
    assert got.min_margin == pytest.approx(margins.min_margin, rel=1e-5, abs=1e-9)
    assert got.max_margin == pytest.approx(margins.max_margin, rel=1e-5)
    assert got.mean_relative_margin == pytest.approx(margins.mean_relative_margin, rel=1e-5)
    for e in EPS:  # float32 vs float64 softmax: an entry within ~1e-8 of b +- eps may fall either way
        assert abs(got.fragile_pairs[e] - margins.fragile_pairs[e]) <= 3, e
    assert abs(sum(np.abs(np.subtract(got.histogram[1], margins.histogram[1])))) <= 6

    got = res["collapse"]
    assert got.num_tokens == n
    for key in ("logit_effective_rank", "logit_effective_rank_centered", "logit_effective_rank_column_centered",
                "mean_expert_cosine"):
        assert getattr(got, key) == pytest.approx(getattr(collapse, key), rel=1e-5), key
    np.testing.assert_allclose(got.logit_spectrum, collapse.logit_spectrum, rtol=1e-5)
    np.testing.assert_allclose(got.expert_cosine, collapse.expert_cosine, atol=1e-6)


def test_layer_stream_sigmoid_and_unknown_layers():
    """The general load path (sigmoid probabilities) and the recomputed top-k (unknown semantics, ties to the
    lowest index) through the stream, against the one-shot functions on the same float32 inputs."""
    z = _hard_logits(300, seed=3)
    for info, source in ((SEMANTICS["sigmoid"], "recomputed native"),
                         (LayerInfo("l", num_experts=N, top_k=K), "recomputed top-k")):
        stream = LayerStream.empty(info, K, EPS)
        mask = stream.update(_chunk(z))
        assert stream.source == source
        zf = z.float()
        probs = probabilities(zf, info.score_function)
        if source == "recomputed native":
            assert torch.equal(mask, reroute(z, "native", k=K, layer=info).mask)
        else:
            assert torch.equal(mask, token_choice(probs, K).mask)  # ties to the lowest expert index
        ref = load_stats(mask.numpy(), probs.numpy(), logits=zf.numpy(), top_k=K)
        got = stream.result()["load"]
        np.testing.assert_array_equal(got.counts, ref.counts)
        assert got.token_entropy == pytest.approx(ref.token_entropy, rel=1e-5)
        assert got.z_loss == pytest.approx(ref.z_loss, rel=1e-5)


def test_captured_selection_and_native_agreement_with_replay():
    """A captured selection (indices, two tokens altered, one of them to a tie's other side) is the model's
    mask, and the agreement computed with the stream's replay equals the partial re-routing by itself."""
    z = _hard_logits(90, seed=5)
    info = SEMANTICS["softmax"]
    sel = torch.topk(z.double(), K, dim=-1).indices
    sel[0, 1] = (sel[0, 1] + 1) % N
    sel[5, 0] = (sel[5, 0] + 3) % N
    stream = LayerStream.empty(info, K, EPS)
    mask = stream.update(_chunk(z, selected=sel))
    want = torch.zeros(z.shape[0], N, dtype=torch.bool).scatter_(1, sel, True)
    assert stream.source == "captured" and torch.equal(mask, want)
    alone = NativeAgreementPartial.empty(N)
    alone.update(z, sel, info)
    got, ref = stream.native.result(), alone.result()
    assert (got.tokens, got.agreeing_tokens, got.tied_tokens) == (ref.tokens, ref.agreeing_tokens, ref.tied_tokens)
    assert got.agreeing_tokens < got.tokens


def test_collapse_thread_and_pickling_leave_the_numbers_unchanged():
    """The collapse Grams on a worker thread (logits in two buffers taken in turn) give the same bytes as on
    this thread, over chunks of odd and even numbers of blocks; a pickled stream carries no work buffers and
    merges as the original."""
    import pickle

    from usmoe_lp.diagnostics.stream import stream_chunks

    g = torch.Generator().manual_seed(11)
    sizes = (2 * BLOCK_TOKENS + 5, 7, BLOCK_TOKENS + 1)  # 3, 1 and 2 blocks
    zs = [(2.0 * torch.randn(n, N, generator=g)).to(torch.bfloat16) for n in sizes]
    info = SEMANTICS["softmax"]
    results = []
    for threads in (False, True):
        stream = stream_chunks(LayerStream.empty(info, K, EPS), [_chunk(z) for z in zs], threads=threads)
        results.append(stream)
    a, b = (s.result() for s in results)
    assert a["collapse"].to_dict() == b["collapse"].to_dict()
    assert a["load"].to_dict() == b["load"].to_dict() and a["margins"].to_dict() == b["margins"].to_dict()
    blob = pickle.dumps(results[0])
    assert len(blob) < 100_000  # no work buffers (several MB) travel with the state
    back = pickle.loads(blob)
    assert back.result()["collapse"].to_dict() == a["collapse"].to_dict()
    merged = back.merge(results[1]).result()
    assert merged["tokens"] == 2 * sum(sizes) and merged["load"].counts.sum() == 2 * K * sum(sizes)
