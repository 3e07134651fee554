"""Token Choice: each token takes its k highest-scoring experts (Shazeer et al. 2017; Fedus et al. 2021)."""

from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import model_probabilities
from usmoe_lp.routers.spec import Router
from usmoe_lp.routing.routers import token_choice

ROUTER = Router(
    name="tc",
    summary="Token Choice: each token takes its k best experts by the model's probabilities",
    reference="Shazeer et al. 2017 (arXiv 1701.06538); Fedus et al. 2021 (arXiv 2101.03961)",
    params=(),
    scores=model_probabilities,
    route=lambda s, p, ctx, pad, state: token_choice(s, ctx.k, padding_mask=pad),
    label=lambda p, k: f"tc k={k}",
    exact=True,
    problem=lambda S, p, rp, key, ctx: RoutingProblem.token_choice(S, ctx.k),
    group=lambda p: "token",
    prefix="token_local",
    decode="the same k experts as in a full forward: a token's choice depends on its own logits only",
    order=10,
)
