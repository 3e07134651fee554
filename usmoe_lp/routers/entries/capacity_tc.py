"""Token Choice with per-expert capacity and dropping, GShard/Switch style (a heuristic for the capped program)."""

from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import model_probabilities, per_group
from usmoe_lp.routers.spec import Param, Router
from usmoe_lp.routing.routers import capacity_token_choice

ROUTER = Router(
    name="capacity_tc",
    summary="Token Choice with capacity C = ceil(cf * T * k / N) per expert; assignments beyond it are dropped",
    reference="Lepikhin et al. 2020 (arXiv 2006.16668); Fedus et al. 2021 (arXiv 2101.03961)",
    params=(Param("capacity_factor", float, 1.25, "expert capacity C = ceil(cf * T * k / N) (Switch default 1.25)",
                  low=0.0, low_open=True),
            Param("policy", str, "position", "the order assignments are served in: position or priority "
                  "(descending top-1 score, Riquelme et al. 2021)", choices=("position", "priority"))),
    scores=model_probabilities,
    route=lambda s, p, ctx, pad, state: capacity_token_choice(
        s, ctx.k, capacity_factor=p["capacity_factor"], policy=p["policy"], padding_mask=pad),
    label=lambda p, k: f"captc cf={p['capacity_factor']:g}" + (" priority" if p["policy"] == "priority" else ""),
    exact=False,
    problem=lambda S, p, rp, key, ctx: RoutingProblem(S, token_max=ctx.k, expert_max=per_group(rp["capacity"], key)),
    prefix="recompute",
    decode=("a decode step is a sequence of one token: capacity ceil(cf * k / N) >= 1, so the token keeps its "
            "top-k experts (no drop at decode time)"),
    order=40,
)
