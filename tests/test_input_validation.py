"""Bad input at the public API: a clear UsmoeLpError naming the problem, never a silent wrong
routing (integers rounded through float32, complex parts dropped, masks read by truthiness)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from usmoe_lp.errors import AllPaddingWarning, InvalidParameter, InvalidScores, UsmoeLpError
from usmoe_lp.lp import RoutingProblem, solve
from usmoe_lp.routing import (
    capacity_token_choice,
    expert_choice,
    global_topc,
    sigmoid_score,
    softmax_score,
    token_choice,
    unified_score,
)

ROUTERS = {
    "token_choice": lambda s, **kw: token_choice(s, 1, **kw),
    "expert_choice": lambda s, **kw: expert_choice(s, capacity=1, **kw),
    "global_topc": lambda s, **kw: global_topc(s, budget=1, **kw),
    "capacity_token_choice": lambda s, **kw: capacity_token_choice(s, 1, **kw),
}


# ----------------------------------------------------------------------------- integer scores
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integers_route_exactly(dtype):
    """16777217 is not a float32: the old cast picked expert 0."""
    S = torch.tensor([[16777216, 16777217, 3]], dtype=dtype)
    assert token_choice(S, k=1).mask.int().tolist() == [[0, 1, 0]]
    assert global_topc(S, budget=1).mask.int().tolist() == [[0, 1, 0]]


def test_integers_beyond_2_53_are_refused():
    S = np.array([[2**53, 2**53 + 1, 3]], dtype=np.int64)
    with pytest.raises(InvalidScores, match="2\\*\\*53"):
        RoutingProblem.token_choice(S, 1)
    with pytest.raises(InvalidScores, match="2\\*\\*53"):
        token_choice(torch.as_tensor(S), 1)
    ok = np.array([[2**52, 2**52 + 1, 3]], dtype=np.int64)  # exact in float64: routed right
    assert solve(RoutingProblem.token_choice(ok, 1)).mask.tolist() == [[False, True, False]]
    assert token_choice(torch.as_tensor(ok), 1).mask.tolist() == [[False, True, False]]


# ----------------------------------------------------------------------------- non-real scores
BAD_SCORES = [
    (np.array([[1 + 2j, 1 + 0j]]), "complex"),
    (torch.tensor([[1 + 2j, 1 + 0j]]), "complex"),
    (np.array([["a", "b"]]), "real numeric"),
    (np.array([[1, 2]], dtype=object), "real numeric"),
    (torch.tensor([[True, False]]), "bool"),
]


@pytest.mark.parametrize(("scores", "match"), BAD_SCORES)
def test_non_real_scores_are_refused_everywhere(scores, match):
    with pytest.raises(InvalidScores, match=match):
        RoutingProblem.token_choice(scores, 1)
    for route in ROUTERS.values():
        with pytest.raises(InvalidScores, match=match):
            route(scores)
    with pytest.raises(InvalidScores, match=match):
        softmax_score(scores)


def test_bfloat16_is_converted_exactly():
    S = torch.tensor([[0.5, 1.25, -3.0]], dtype=torch.bfloat16)
    p = RoutingProblem.token_choice(S, 1)
    assert p.scores.dtype == np.float64 and p.scores.tolist() == [[0.5, 1.25, -3.0]]
    assert solve(p).mask.tolist() == token_choice(S, 1).mask.tolist() == [[False, True, False]]


# ----------------------------------------------------------------------------- padding masks
def test_attention_mask_as_padding_mask_is_refused_with_the_conversion():
    S = torch.rand(1, 3, 4)
    attention_mask = torch.tensor([[1, 1, 1]])
    for route in ROUTERS.values():
        with pytest.raises(InvalidParameter, match="attention_mask == 0"):
            route(S, padding_mask=attention_mask)
        with pytest.raises(InvalidParameter, match="True where the token is padding"):
            route(S, padding_mask=np.array([[0.0, 0.0, 1.0]]))
    r = token_choice(S, 1, padding_mask=attention_mask == 0)  # the documented conversion
    assert r.num_tokens == 3 and int(r.mask.sum()) == 3


def test_all_padding_is_explicit():
    """Not silent: a warning and params['all_padding'], and nothing routed."""
    routers = {**ROUTERS, "global_topc": lambda s, **kw: global_topc(s, kbar=1, **kw)}
    for route in routers.values():
        with pytest.warns(AllPaddingWarning, match="every token as padding"):
            r = route(torch.rand(2, 3, 4), padding_mask=torch.ones(2, 3, dtype=torch.bool))
        assert r.params["all_padding"] is True and int(r.mask.sum()) == 0
    with pytest.raises(InvalidParameter, match="exceeds"), pytest.warns(AllPaddingWarning):  # no room at all
        global_topc(torch.rand(1, 2, 3), budget=1, padding_mask=torch.ones(1, 2, dtype=torch.bool))
    # one sequence all padding in a batch is ordinary: it routes nothing, no flag
    pm = torch.tensor([[True, True, True], [False, False, True]])
    r = token_choice(torch.rand(2, 3, 4), 1, padding_mask=pm)
    assert int(r.mask[0].sum()) == 0 and "all_padding" not in r.params


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("call", [
    lambda: global_topc(torch.rand(3, 4), kbar="1"),
    lambda: global_topc(torch.rand(3, 4), budget="2"),
    lambda: global_topc(torch.rand(3, 4), kbar=1 + 0j),
    lambda: unified_score(torch.zeros(1, 4), alpha="0.5"),
    lambda: unified_score(torch.zeros(1, 4), alpha=float("nan")),
    lambda: expert_choice(torch.rand(4, 3), capacity_factor="1"),
    lambda: token_choice(torch.rand(4, 3), k="1"),
    lambda: RoutingProblem.budget(np.ones((2, 2)), "2"),
])
def test_string_and_non_real_parameters_get_a_message(call):
    with pytest.raises(InvalidParameter, match="must (be|lie)"):
        call()


def test_huge_budget_is_not_wrapped():
    for call in (lambda: global_topc(torch.rand(3, 4), budget=2**63 - 1),
                 lambda: RoutingProblem.budget(np.ones((2, 2)), 2**63 - 1),
                 lambda: RoutingProblem.budget(np.ones((2, 2)), 2**64),
                 lambda: RoutingProblem(np.ones((2, 2)), token_max=2**64)):
        with pytest.raises(InvalidParameter) as err:
            call()
        assert not re.search(r"(?<![\w*])-\d", str(err.value)), str(err.value)  # no wrapped negative
    with pytest.raises(InvalidParameter, match="9223372036854775807 exceeds"):
        RoutingProblem.budget(np.ones((2, 2)), 2**63 - 1)


def test_expert_choice_k_beyond_n_is_refused_like_token_choice():
    with pytest.raises(InvalidParameter, match="k = 5 exceeds the number of experts N = 3"):
        token_choice(torch.rand(4, 3), k=5)
    with pytest.raises(InvalidParameter, match="k = 5 exceeds the number of experts N = 3"):
        expert_choice(torch.rand(4, 3), k=5)


# ----------------------------------------------------------------------------- score functions
@pytest.mark.parametrize("fn", [softmax_score, sigmoid_score, unified_score])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_score_functions_refuse_non_finite_logits(fn, bad):
    Z = torch.zeros(2, 3)
    Z[1, 2] = bad
    Z[0, 0] = bad if bad != bad else Z[0, 0]  # a second NaN when NaN
    with pytest.raises(InvalidScores, match=r"logits has .*first at index \((0, 0|1, 2)\)"):
        fn(Z)


def test_every_new_error_is_a_usmoe_lp_error():
    with pytest.raises(UsmoeLpError):
        token_choice(torch.tensor([[1 + 1j]]), 1)


def test_leakage_reads_scores_by_the_routers_dtype_rule():
    """The leakage diagnostics take scores through the same rule as the routers: integers exact (2**24 + 1 is
    not rounded to 2**24, which would tie it with expert 0), bool and complex refused."""
    from usmoe_lp.diagnostics.leakage import prefix_consistency

    ints = torch.tensor([[16777216, 16777217, 3], [5, 16777217, 16777216]])
    assert prefix_consistency(ints, "ec", k=1) == prefix_consistency(ints.double(), "ec", k=1)
    for bad in (torch.ones(2, 3, dtype=torch.bool), np.ones((2, 3), dtype=complex)):
        with pytest.raises(InvalidScores):
            prefix_consistency(bad, "tc", k=1)


def test_diagnostics_take_the_one_padding_convention():
    """Every diagnostics entry point reads padding_mask through check_padding_mask (bool, True = padding):
    a Hugging Face attention_mask (ints, 1 = real token) is refused with the conversion, never inverted."""
    from usmoe_lp.diagnostics import (
        AnalyzeConfig,
        CounterfactualPartial,
        RouterConfig,
        analyze_logits,
        aux_loss,
        cross_sequence_dependence,
        decode_mismatch,
        prefix_consistency,
    )

    s = torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(0))
    am = torch.tensor([[1, 1, 0]])
    calls = {
        "prefix_consistency": lambda m: prefix_consistency(s, "ec", k=1, padding_mask=m),
        "decode_mismatch": lambda m: decode_mismatch(s, "tc", k=1, padding_mask=m),
        "cross_sequence_dependence": lambda m: cross_sequence_dependence(s, "usmoe", k=1, scope="batch",
                                                                         padding_mask=m),
        "counterfactual": lambda m: CounterfactualPartial.empty(4, [RouterConfig("tc", 1)]).update(s, padding_mask=m),
        "analyze_logits": lambda m: analyze_logits(s, top_k=1, padding_mask=m,
                                                   config=AnalyzeConfig(routers=("tc",), leakage=False)),
        "aux_loss": lambda m: aux_loss((s.reshape(3, 4),), 1, padding_mask=m),
    }
    for call in calls.values():
        with pytest.raises(InvalidParameter, match="attention_mask == 0"):
            call(am)
        call(am == 0)  # the documented conversion is accepted
    with pytest.raises(InvalidParameter, match="padding_mask = attention_mask == 0"):
        analyze_logits(s, top_k=1, attention_mask=am)
