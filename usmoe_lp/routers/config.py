"""One router setting (:class:`RouterConfig`), the standard sweep, and re-routing of logits.

A :class:`RouterConfig` is a registry router with its parameters validated and defaults filled
in; its :attr:`~RouterConfig.label` names it in every table and figure. :func:`reroute` turns
captured router logits into that router's :class:`~usmoe_lp.routing.Routing`;
:func:`prepare_logits` is the one definition of how logits enter any router (dtype rule, shape,
padding, finiteness), read by every consumer.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from usmoe_lp._validate import as_score_tensor, check_int, check_padding_mask
from usmoe_lp.errors import AllPaddingWarning, InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routers.registry import ROUTERS, get_router
from usmoe_lp.routers.spec import Router, RouterContext
from usmoe_lp.routing import Routing


@dataclass(frozen=True, init=False)
class RouterConfig:
    """A registry router with validated parameters.

    ``RouterConfig(router, k, **params)``: ``router`` a name of :func:`usmoe_lp.list_routers`,
    ``k`` the model's experts per token (int >= 1: the budget unit and the matched budget), and
    the router's own parameters (``RouterConfig("usmoe", 2, kbar=1.5, alpha=0.5)``); those not
    given take the router's defaults. A parameter the router does not have is an error that names
    the routers which do.

    Parameters read as attributes (``config.kbar``); :meth:`get` returns None for a parameter the
    router does not have.

    >>> RouterConfig("usmoe", 2, kbar=1.5, alpha=0.5).label
    'usmoe a=0.5 kbar=1.5 seq'
    >>> RouterConfig("ec", 2).label, RouterConfig("capacity_tc", 2).label
    ('ec cf=1', 'captc cf=1.25')
    """

    router: str
    k: int
    params: tuple[tuple[str, Any], ...]

    def __init__(self, router: str, k: int, **params: Any) -> None:
        entry = get_router(router)
        k = check_int(k, "k", low=1)
        unknown = [name for name in params if name not in entry.param_names]
        if unknown:
            owners = {name: [r.name for r in ROUTERS.values() if name in r.param_names] for name in unknown}
            parts = [f"{name} is a parameter of {', '.join(o) if o else 'no registered router'}"
                     for name, o in owners.items()]
            accepted = ", ".join(entry.param_names) or "no parameters"
            raise InvalidParameter(f"router {entry.name!r} takes {accepted}; " + "; ".join(parts))
        values = []
        for p in entry.params:
            value = params.get(p.name)
            if value is None:
                value = p.resolve_default(k)
                if value is None:
                    raise InvalidParameter(f"router {entry.name!r} needs {p.name}= ({p.help})")
            values.append((p.name, p.check(value, entry.name)))
        object.__setattr__(self, "router", entry.name)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "params", tuple(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("router", "k", "params"):
            raise AttributeError(name)
        for key, value in object.__getattribute__(self, "params"):
            if key == name:
                return value
        raise AttributeError(f"router {self.router!r} has no parameter {name!r}")

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params)
        return f"RouterConfig({self.router!r}, {self.k}{args})"

    @property
    def entry(self) -> Router:
        """The registry :class:`Router`."""
        return ROUTERS[self.router]

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def get(self, name: str, default: Any = None) -> Any:
        """The value of parameter ``name``, or ``default`` where the router has none."""
        return dict(self.params).get(name, default)

    @property
    def label(self) -> str:
        """Short stable name: ``tc k=2``, ``ec cf=1``, ``usmoe a=0.5 kbar=1.5 seq``, ..."""
        return self.entry.label(self.param_dict, self.k)

    def check_experts(self, num_experts: int) -> None:
        """Raise :class:`InvalidParameter` if the config cannot route N = ``num_experts`` experts."""
        if self.k > num_experts:
            raise InvalidParameter(f"{self.label}: k = {self.k} exceeds the number of experts N = {num_experts}")
        for p in self.entry.params:
            if p.at_most_experts and self.get(p.name) > num_experts:
                raise InvalidParameter(f"{self.label}: {p.name} = {self.get(p.name):g} exceeds the number of "
                                       f"experts N = {num_experts}")

    def to_dict(self) -> dict:
        """JSON-ready: ``router``, ``label``, ``k`` and every parameter of the router."""
        return {"router": self.router, "label": self.label, "k": self.k, **self.param_dict}


SWEEP_DEFAULTS: Mapping[str, tuple] = {"alpha": (0.3, 0.5, 0.7), "scope": ("sequence",)}
"""Default values swept for parameters that several routers share (``kbar`` defaults per k: :func:`default_kbars`)."""


def default_kbars(k: int) -> tuple[float, ...]:
    """k/2, k, 3k/2, plus k -/+ 1/2 when k is even, so the grid always has the matched budget k and
    a fractional k-bar (k = 1: 0.5, 1, 1.5; k = 2: 1, 1.5, 2, 2.5, 3)."""
    vals = {k / 2, float(k), 1.5 * k}
    if k % 2 == 0:
        vals.update({k - 0.5, k + 0.5})
    return tuple(sorted(vals))


def router_grid(router: str, k: int, *, sweep: Mapping[str, Sequence] | None = None,
                num_experts: int | None = None) -> tuple[RouterConfig, ...]:
    """The settings of ``router`` for a model with top-``k`` routing: the Cartesian product of the
    swept values of its parameters (``sweep``: parameter name -> values; a parameter not swept takes
    its default). ``kbar`` is swept over :func:`default_kbars` unless given; with ``num_experts``,
    settings whose ``at_most_experts`` parameters exceed N are left out."""
    entry = get_router(router)
    sweep = {**SWEEP_DEFAULTS, "kbar": default_kbars(k), **(sweep or {})}
    names = [p.name for p in entry.params if p.name in sweep]
    out = []
    for combo in itertools.product(*(tuple(sweep[n]) for n in names)):
        values = dict(zip(names, combo, strict=True))
        if num_experts is not None and any(entry.param(n).at_most_experts and v > num_experts
                                           for n, v in values.items()):
            continue
        out.append(RouterConfig(entry.name, k, **values))
    return tuple(out)


def default_configs(k: int, *, routers: Sequence[str] = ("tc", "ec", "capacity_tc", "usmoe"),
                    alphas=None, kbars=None, scopes=("sequence",), capacity_factor: float | None = None,
                    num_experts: int | None = None, sweep: Mapping[str, Sequence] | None = None
                    ) -> tuple[RouterConfig, ...]:
    """The standard counterfactual grid: each router of ``routers`` over the swept values, in order.

    ``alphas``, ``kbars``, ``scopes``, ``capacity_factor`` are shorthands for ``sweep`` entries
    (``capacity_factor`` sets Expert Choice's only; capacity-TC keeps the Switch default 1.25).

    >>> [c.label for c in default_configs(1, alphas=(0.5,))]
    ['tc k=1', 'ec cf=1', 'captc cf=1.25', 'usmoe a=0.5 kbar=0.5 seq', 'usmoe a=0.5 kbar=1 seq',
     'usmoe a=0.5 kbar=1.5 seq']
    """
    k = check_int(k, "k", low=1)
    base: dict[str, Sequence] = dict(sweep or {})
    if alphas is not None:
        base["alpha"] = tuple(alphas)
    if kbars is not None:
        base["kbar"] = tuple(kbars)
    if scopes is not None:
        base["scope"] = tuple(scopes)
    out: list[RouterConfig] = []
    for name in routers:
        per = dict(base)
        if name == "ec" and capacity_factor is not None:
            per["capacity_factor"] = (capacity_factor,)
        out.extend(router_grid(name, k, sweep=per, num_experts=num_experts))
    if num_experts is not None:
        for c in out:
            c.check_experts(num_experts)
    return tuple(out)


# ----------------------------------------------------------------------------- logits in, routing out
def prepare_logits(logits, padding_mask=None, *, name: str = "logits"):
    """Validated router logits for any router: ``(z, valid, squeeze)``.

    logits: (T, N) or (B, T, N), torch (any real dtype, bfloat16 included) or numpy; integers are
    taken exactly (:func:`usmoe_lp._validate.as_score_tensor`), complex and bool refused.
    padding_mask: (T,) or (B, T) bool, True = padding (the package's one convention).
    Returns z (B, T, N) float64 with padding rows set to 0 (so garbage there is ignored), valid
    (B, T) bool (True = real token) and whether the input was 2-D. NaN/Inf in a real token raise
    :class:`InvalidScores` naming the count and the first index.
    """
    z = as_score_tensor(logits, name).detach()
    if z.ndim not in (2, 3):
        raise InvalidScores(f"{name} must be (T, N) or (B, T, N), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise InvalidScores(f"{name} are empty (shape {tuple(z.shape)}); need B, T, N >= 1")
    z = z.to(torch.float64)
    squeeze = z.ndim == 2
    z3 = z.unsqueeze(0) if squeeze else z
    B, T, _ = z3.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=z3.device)
    if padding_mask is not None:
        pm = check_padding_mask(padding_mask).to(z3.device)
        pm = pm.unsqueeze(0) if pm.ndim == 1 else pm
        if tuple(pm.shape) != (B, T):
            raise ShapeMismatch(f"padding_mask has shape {tuple(pm.shape)}; expected {tuple(z.shape[:-1])} "
                                "(True marks padding)")
        valid = ~pm
        if not bool(valid.all()):
            z3 = z3.masked_fill(pm.unsqueeze(-1), 0.0)
    if not bool(torch.isfinite(z3).all()):
        bad = ~torch.isfinite(z3)
        first = tuple(int(v) for v in bad.nonzero()[0])
        first = first[1:] if squeeze else first
        raise InvalidScores(f"{name} have {int(bad.sum())} NaN/Inf entries in real tokens (first at {first}); "
                            "mark padding with padding_mask or drop the broken rows")
    return z3, valid, squeeze


def route_scores(config: RouterConfig, scores: torch.Tensor, ctx: RouterContext, padding_mask=None,
                 state: Any = None) -> Routing:
    """Run ``config``'s fast function on its own (B, T, N) scores; a padding-only sequence of a batch
    routes nothing, silently (it is expected in a stream of batches)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AllPaddingWarning)
        return config.entry.route(scores, config.param_dict, ctx, padding_mask, state)


def reroute(logits, config: RouterConfig | str, *, k: int | None = None, padding_mask=None,
            score_function: str = "softmax", layer=None, state: Any = None, **params: Any) -> Routing:
    """Route captured router logits with a registry router.

    Args:
        logits: (T, N) or (B, T, N) float (torch incl. bfloat16, or numpy): the model's router
            logits before any top-k, scored in float64 whatever their dtype.
        config: a :class:`RouterConfig`, or a router name with ``k`` and ``**params``.
        padding_mask: (T,) or (B, T) bool, True where the token is padding (never selected).
        score_function: how the model turns logits into probabilities (``softmax``, ``sigmoid``,
            ``softmax_topk``, ``unknown``), or taken from ``layer``.
        layer: the layer's :class:`usmoe_lp.logs.LayerInfo` (the model's routing semantics; needed
            by ``native``).
        state: the state of a stateful router (``Routing.params["state"]`` of the previous call).

    Returns:
        The router's :class:`~usmoe_lp.routing.Routing`, same rank as ``logits``; ``weights`` are
        its own scores of the selected pairs.

    >>> import torch
    >>> z = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> reroute(z, "ec", k=1).mask.int().tolist()   # e = ceil(3 * 1 / 2) = 2
    [[1, 0], [1, 1], [0, 1]]
    >>> r = reroute(z, "usmoe", k=1, kbar=0.5, alpha=0.0)   # c = round(1.5) = 2
    >>> r.mask.int().tolist(), r.dropped_tokens
    ([[1, 0], [0, 0], [0, 1]], 1)
    """
    if not isinstance(config, RouterConfig):
        if k is None:
            k = getattr(layer, "top_k", None)
            if k is None:
                raise InvalidParameter("give k= (the model's experts per token) with a router name")
        config = RouterConfig(config, k, **params)
    elif params or k is not None:
        raise InvalidParameter("pass parameters either in the RouterConfig or as keywords, not both")
    if layer is not None:
        score_function = getattr(layer, "score_function", score_function)
    z3, valid, squeeze = prepare_logits(logits, padding_mask)
    config.check_experts(z3.shape[-1])
    ctx = RouterContext(k=config.k, num_experts=int(z3.shape[-1]), score_function=score_function, layer=layer)
    pad = None if bool(valid.all()) else ~valid
    scores = config.entry.scores(z3, config.param_dict, ctx)
    r = route_scores(config, scores, ctx, pad, state)
    if squeeze:
        r = Routing(mask=r.mask[0], weights=r.weights[0], router=r.router, params=r.params,
                    token_mask=None if r.token_mask is None else r.token_mask[0])
    return r

