"""Expert Choice: each expert takes its e best tokens of each sequence (Zhou et al. 2022)."""

from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import model_probabilities, per_group
from usmoe_lp.routers.spec import Param, Router
from usmoe_lp.routing.routers import expert_capacity, expert_choice

ROUTER = Router(
    name="ec",
    summary="Expert Choice: each expert takes its e = ceil(cf * T * k / N) best tokens of each sequence",
    reference="Zhou et al. 2022 (arXiv 2202.09368)",
    params=(Param("capacity_factor", float, 1.0, "expert capacity e = ceil(cf * T * k / N) tokens per sequence",
                  low=0.0, low_open=True),),
    scores=model_probabilities,
    route=lambda s, p, ctx, pad, state: expert_choice(s, capacity_factor=p["capacity_factor"], k=ctx.k,
                                                      padding_mask=pad),
    label=lambda p, k: f"ec cf={p['capacity_factor']:g}",
    exact=True,
    problem=lambda S, p, rp, key, ctx: RoutingProblem.expert_choice(S, per_group(rp["capacity"], key)),
    prefix="expert_capacity",
    prefix_budget=lambda t, n, p, k: min(expert_capacity(p["capacity_factor"], t, k, n), t),
    decode=("a decode step is a sequence of one token: e = min(ceil(cf * k / N), 1) = 1, so every expert "
            "takes the token (Expert Choice is not causal; see the leakage analysis)"),
    order=20,
)
