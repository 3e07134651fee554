"""PatternStream: the per-layer container of the routing-pattern partials (protocol, cuts, JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.cluster import tree_merge
from usmoe_lp.diagnostics.coactivation import CoactivationPartial
from usmoe_lp.diagnostics.domain import DomainPartial
from usmoe_lp.diagnostics.locality import LocalityPartial
from usmoe_lp.diagnostics.partial import Partial
from usmoe_lp.diagnostics.patterns import PATTERN_KEYS, PatternStream
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.transitions import TransitionPartial
from usmoe_lp.diagnostics.vocab import VocabPartial
from usmoe_lp.errors import InvalidParameter, ShapeMismatch

NAMES = ("code", "math", "web")


def log(rng, n, N, k, n_seq=4):
    ranked = np.argsort(rng.random((n, N)), axis=1)[:, :k]
    ranked[rng.random((n, k)) < 0.1] = -1
    seq = rng.integers(0, n_seq, n)
    pos = np.zeros(n, dtype=np.int64)
    for s in range(n_seq):
        pos[seq == s] = np.arange(int((seq == s).sum()))
    return Routed(ranked, N, token_ids=rng.integers(-1, 8, n), sequence_ids=seq, positions=pos,
                  domains=rng.integers(-1, len(NAMES), n))


def cut(r, lo, hi):
    return Routed(r.ranked[lo:hi], r.num_experts, token_ids=r.token_ids[lo:hi], sequence_ids=r.sequence_ids[lo:hi],
                  positions=r.positions[lo:hi], domains=r.domains[lo:hi])


def test_every_pattern_partial_follows_the_protocol():
    for p in (CoactivationPartial.empty(3), VocabPartial.empty(3), DomainPartial.empty(3, NAMES),
              LocalityPartial.empty(3), TransitionPartial.empty(3, 3), PatternStream.empty(3, 2)):
        assert isinstance(p, Partial)


def test_stream_equals_its_partials_and_serialises():
    rng = np.random.default_rng(12)
    r = log(rng, 500, 6, 2)
    s = PatternStream.empty(6, 2, domain_names=NAMES, min_count=3)
    s.update(r)
    out = s.result()
    parts = [CoactivationPartial.empty(6), VocabPartial.empty(6, 3), DomainPartial.empty(6, NAMES),
             LocalityPartial.empty(6)]
    for p in parts:
        p.update(r)
    assert (out.coactivation.counts == parts[0].result().counts).all()
    assert out.vocab.to_dict() == parts[1].result().to_dict()
    assert out.domain.to_dict() == parts[2].result().to_dict()
    assert out.locality.to_dict() == parts[3].result().to_dict()
    j = out.to_json()
    assert list(j) == ["num_experts", "top_k", *PATTERN_KEYS]
    text = json.dumps(j, allow_nan=False)  # NaN became null
    assert "lru_hit_rate" in j["locality"] and "expert_reuse_rate" in j["locality"]
    assert "lift" not in j["coactivation_lift"] and len(out.to_json(matrices=True)["coactivation_lift"]["lift"]) == 6
    assert json.loads(text)["top_k"] == 2
    plain = PatternStream.empty(6, 2)
    plain.update(cut(r, 0, 10))
    assert plain.result().domain is None and plain.result().to_json()["domain_specialisation"] is None


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 120), cuts=st.lists(st.integers(0, 120), max_size=6))
def test_stream_is_invariant_to_cuts_merged_in_tree_order(seed, n, cuts):
    rng = np.random.default_rng(seed)
    r = log(rng, n, 5, 3)
    whole = PatternStream.empty(5, 3, domain_names=NAMES, min_count=2)
    whole.update(r)
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        p = PatternStream.empty(5, 3, domain_names=NAMES, min_count=2)
        p.update(cut(r, lo, hi))
        parts.append(p)
    merged = tree_merge(parts)
    a, b = whole.result().to_json(matrices=True), merged.result().to_json(matrices=True)
    assert a == b  # bit for bit: every float comes from the same integer state


def test_stream_errors():
    with pytest.raises(InvalidParameter, match="top_k"):
        PatternStream.empty(4, 5)
    s = PatternStream.empty(4, 2, domain_names=NAMES)
    r = Routed(np.array([[0, 1]]), 4, token_ids=[0], sequence_ids=[0], positions=[0])
    with pytest.raises(InvalidParameter, match="domains="):
        s.update(r)
    assert s.coactivation.tokens == 0 and s.locality.tokens == 0  # nothing half-added
    with pytest.raises(ShapeMismatch, match="N = 3"):
        s.update(Routed(np.array([[0]]), 3, token_ids=[0], sequence_ids=[0], positions=[0]))
    with pytest.raises(ShapeMismatch):
        s.merge(PatternStream.empty(4, 2))
