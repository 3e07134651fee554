"""USMoE: the global top-c of the unified score over a scope (arXiv 2503.22996, Alg. 1)."""

from usmoe_lp._validate import round_half_up
from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import ALPHA, KBAR, SCOPE, SCOPE_SHORT, per_group, unified
from usmoe_lp.routers.spec import Router
from usmoe_lp.routing.routers import global_topc, token_choice


def decode_route(scores, params, ctx):
    """(B, T, N) bool: the routing a KV-cache decoder computes, one token per step and per sequence.

    A decode step of one sequence is a group of one token, whatever the scope, with budget
    c = round_half_up(kbar): Token Choice with that many experts on the unified score (none when
    kbar < 1/2). Equal to routing each token as a sequence of its own, computed in one call.
    """
    c = min(round_half_up(params["kbar"]), scores.shape[-1])
    if c == 0:
        return scores.new_zeros(scores.shape, dtype=bool)
    return token_choice(scores, c).mask

ROUTER = Router(
    name="usmoe",
    summary="USMoE: the c = round_half_up(kbar * tokens) best token-expert pairs of each group by the unified score",
    reference="Nguyen et al. 2025, USMoE (arXiv 2503.22996), Def. 3.2 and Alg. 1",
    params=(SCOPE, KBAR, ALPHA),  # sweep order: scope, then kbar, then alpha (innermost)
    scores=unified,
    route=lambda s, p, ctx, pad, state: global_topc(s, kbar=p["kbar"], scope=p["scope"], padding_mask=pad),
    label=lambda p, k: f"usmoe a={p['alpha']:g} kbar={p['kbar']:g} {SCOPE_SHORT[p['scope']]}",
    exact=True,
    problem=lambda S, p, rp, key, ctx: RoutingProblem.budget(S, per_group(rp["budget"], key), sense="=="),
    group=lambda p: p["scope"],
    prefix="global_topc",
    prefix_budget=lambda t, n, p, k: round_half_up(p["kbar"] * t),
    decode_route=decode_route,
    decode=("a decode step is a group of one token with c = round_half_up(kbar): Token Choice with that many "
            "experts on the unified score (the causal_topc router is the variant that keeps kbar)"),
    order=30,
)
