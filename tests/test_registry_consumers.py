"""Every router of the registry works in every diagnostics consumer, with no per-router code.

The routers are enumerated from :func:`usmoe_lp.routers.list_routers`, so a router added to
``usmoe_lp/routers/entries/`` is checked here automatically. Oracles: the router's own fast function
(weights = own scores on the mask, padding never selected), a brute-force re-routing of every
prefix (leakage), the certificate/program contract (certificate present iff the router has a
program; exact routers certified optimal on every group), and the mergeable-partial protocol
(``isinstance`` against :class:`usmoe_lp.diagnostics.partial.Partial`, merge associativity).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.diagnostics import (
    AnalyzeConfig,
    CollapsePartial,
    CounterfactualPartial,
    LeakagePartial,
    LoadPartial,
    MarginPartial,
    NativeAgreementPartial,
    Partial,
    analyze_logits,
    decode_mismatch,
    prefix_consistency,
)
from usmoe_lp.diagnostics.counterfactual import config_scores
from usmoe_lp.logs import LayerInfo, RouterLogWriter
from usmoe_lp.routers import ROUTERS, RouterConfig, RouterContext, list_routers, reroute, route_scores

N, K = 6, 2
NAMES = list_routers()
INFO = LayerInfo("l0", num_experts=N, top_k=K, score_function="softmax")


def _required(param) -> object:
    """A valid value for a parameter without a default (none of today's routers has one)."""
    if param.kind is str:
        return param.choices[0]
    if param.kind is bool:
        return False
    low = 1 if param.low is None else param.low + (1 if param.low_open else 0)
    return param.kind(min(low, N) if param.at_most_experts else low)


def config(name: str) -> RouterConfig:
    entry = ROUTERS[name]
    given = {p.name: _required(p) for p in entry.params if p.default is None}
    return RouterConfig(name, K, **given)


def _logits(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


# ----------------------------------------------------------------------------- per router
@pytest.mark.parametrize("name", NAMES)
def test_config_with_defaults(name):
    c = config(name)
    entry = ROUTERS[name]
    assert c.router == name and c.k == K and tuple(c.param_dict) == entry.param_names
    assert isinstance(c.label, str) and c.label
    assert c.to_dict()["router"] == name
    assert entry.group(c.param_dict) in ("token", "sequence", "batch", "position")


@pytest.mark.parametrize("name", NAMES)
def test_reroute_shapes_padding_and_weights(name):
    c = config(name)
    z = _logits((3, 7, N), 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, :2] = True
    z[pad] = float("nan")  # garbage in padding must be ignored
    r = reroute(z, c, padding_mask=pad, layer=INFO)
    assert r.mask.shape == (3, 7, N) and r.mask.dtype == torch.bool and r.weights.shape == (3, 7, N)
    assert not r.mask[pad].any()
    zz = torch.where(pad.unsqueeze(-1), torch.zeros(()), z)
    own = c.entry.scores(zz, c.param_dict, RouterContext(K, N, "softmax", INFO))
    torch.testing.assert_close(r.weights[r.mask], own[r.mask].to(r.weights.dtype))
    assert (r.weights[~r.mask] == 0).all()
    two_d = reroute(z[1], c, layer=INFO)  # one sequence: same rank out
    assert two_d.mask.shape == (7, N)


@pytest.mark.parametrize("name", NAMES)
def test_counterfactual_certificates(name):
    c = config(name)
    entry = c.entry
    z = _logits((3, 6, N), 2)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    p = CounterfactualPartial.empty(N, [c], lp_sample=2)
    p.update(z[:2], padding_mask=pad[:2], layer=INFO)
    p.update(z[2:], padding_mask=pad[2:], layer=INFO)
    rec = p.result().records[0]
    assert rec.tokens == int((~pad).sum()) and rec.expert_counts.dtype == np.int64
    assert rec.pairs == int(rec.expert_counts.sum())
    assert (rec.certificate is None) == (entry.problem is None)
    if entry.problem is None:
        assert rec.certified_total is None and rec.certified_optimal is None and rec.lp_checked == 0
    elif entry.exact:
        assert rec.certificate in ("closed_form", "lp_duals")
        assert rec.certified_optimal == rec.certified_total == rec.groups > 0
        assert rec.max_lp_gap is not None and rec.max_lp_gap < 1e-9
    else:
        assert rec.certificate == "lp_sample" and rec.certified_total >= 1
    row = p.result().to_frame().iloc[0]
    assert row["router"] == name and row["exact"] == entry.exact and row["prefix_rule"] == entry.prefix
    json.dumps(p.result().to_dict(), allow_nan=False)


@pytest.mark.parametrize("name", [n for n in NAMES if ROUTERS[n].stateful])
def test_stateful_routers_keep_one_state_across_updates(name):
    """The partial chains the router's state through its updates in stream order, as the model would."""
    c = config(name)
    ctx = RouterContext(K, N, "softmax", INFO)
    chunks = [_logits((2, 5, N), 10 + i) for i in range(3)]
    p = CounterfactualPartial.empty(N, [c], lp_sample=0)
    state, counts = None, np.zeros(N, dtype=np.int64)
    for z in chunks:
        p.update(z, layer=INFO)
        r = route_scores(c, c.entry.scores(z, c.param_dict, ctx), ctx, None, state)
        state = r.params["state"]
        counts += r.mask.sum((0, 1)).numpy().astype(np.int64)
    np.testing.assert_array_equal(p.result().records[0].expert_counts, counts)
    fresh = CounterfactualPartial.empty(N, [c], lp_sample=0)
    fresh.update(chunks[2], layer=INFO)
    assert p.states[0] is not None and fresh.states[0] is not None
    assert fresh.merge(p).states[0] is p.states[0]  # a merge keeps the later partial's state


def _brute_leakage(c: RouterConfig, s: np.ndarray):
    """Flip counts per token and displacement per step by routing every prefix with route_scores."""
    ctx = RouterContext(K, s.shape[1], "softmax", INFO)
    st = torch.from_numpy(s)[None]
    D = [route_scores(c, st[:, :t], ctx).mask[0].numpy() for t in range(1, s.shape[0] + 1)]
    full = D[-1]
    flips = [int((D[t][t] != full[t]).sum()) for t in range(s.shape[0])]
    disp = [int((D[t][:t] != D[t - 1][:t]).any(-1).sum()) for t in range(1, s.shape[0])]
    return flips, disp


@pytest.mark.parametrize("name", NAMES)
def test_prefix_consistency_equals_rerouting_every_prefix(name):
    c = config(name)
    entry = c.entry
    z = _logits((9, N), 3)
    s = config_scores(z, c, "softmax", INFO).numpy()
    stats = prefix_consistency(s, c, layer=INFO)
    flips, disp = _brute_leakage(c, s)
    T = s.shape[0]
    assert stats.num_tokens == T and stats.positions_sampled == 0 and stats.prefix_rule == entry.prefix
    assert stats.flip_rate == sum(flips) / (T * N)
    assert stats.token_flip_rate == sum(f > 0 for f in flips) / T
    assert stats.per_offset == [flips[T - 1 - o] / N for o in range(T)]
    if stats.displacement_steps:
        assert stats.displacement_histogram == np.bincount(disp).tolist()
    if entry.prefix in ("token_local", "causal"):
        assert stats.flip_rate == 0.0 and sum(flips) == 0
    # the same through a RouterConfig and through a name with keywords
    again = prefix_consistency(s, name, k=K, layer=INFO, **{p: v for p, v in c.params})
    assert again.to_dict() == stats.to_dict()


@pytest.mark.parametrize("name", NAMES)
def test_decode_time_routing(name):
    c = config(name)
    z = _logits((2, 5, N), 4)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    own = config_scores(z, c, "softmax", INFO)
    d = decode_mismatch(own, c, padding_mask=pad, layer=INFO)
    assert (d.num_tokens, d.num_sequences, d.num_experts) == (8, 2, N)
    assert 0 <= d.token_flips <= d.num_tokens and 0 <= d.pair_flips <= d.num_tokens * N
    if c.entry.decode_route is not None:
        out = c.entry.decode_route(own[:1], c.param_dict, RouterContext(K, N, "softmax", INFO))
        assert tuple(out.shape) == (1, 5, N)
    if c.entry.prefix in ("token_local", "causal") and c.entry.decode_route is None:
        assert d.token_flips == 0  # a token alone decides as in the full sequence


@pytest.mark.parametrize("name", NAMES)
def test_analyze_logits_puts_the_router_in_the_frame(name):
    z = {"a": _logits((3, 8, N), 5).float(), "b": _logits((3, 8, N), 6).float()}
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[2, :3] = True
    c = config(name)
    sweep = {p.name: (_required(p),) for p in c.entry.params if p.default is None}
    res = analyze_logits(z, top_k=K, padding_mask=pad, config=AnalyzeConfig(routers=(name,), sweep=sweep,
                                                                             batch_size=2, lp_sample=1))
    cf = res.counterfactual_frame()
    rows = cf[cf["router"] == name]
    assert set(rows["layer"]) == {"a", "b", "pooled"}
    assert rows["flip_rate"].notna().all() and rows["kv_decode_token_flip_rate"].notna().all()
    for la in res.layers:
        assert set(la.leakage) == set(la.decode) == set(rows["label"])


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory):
    d = tmp_path_factory.mktemp("registry-cli")
    g = torch.Generator().manual_seed(7)
    with RouterLogWriter(d / "log", [LayerInfo("l0", num_experts=N, top_k=K, score_function="softmax")]) as w:
        for sid in range(3):
            w.append({"l0": torch.randn(6, N, generator=g)}, torch.arange(6), torch.full((6,), sid), torch.arange(6))
    return d


def test_cli_analyze_accepts_every_router(tiny_log):
    needed = [f"{p.name}={_required(p)}" for n in NAMES for p in ROUTERS[n].params if p.default is None]
    args = ["analyze", str(tiny_log / "log"), "--out", str(tiny_log / "rep"), "--routers", ",".join(NAMES),
            "--no-leakage"]
    for item in dict.fromkeys(needed):
        args += ["--param", item]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tiny_log / "rep" / "metrics.json").read_text())
    assert {r["router"] for r in metrics["pooled"]["counterfactual"]} == set(NAMES)


def test_cli_routers_and_params_errors(tiny_log):
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(tiny_log / "log"), "--out", str(tiny_log / "x"), "--routers", "sinkhron"])
    assert res.exit_code == 2
    assert "--routers sinkhron: unknown router; choose one of" in " ".join(res.output.split())
    res = runner.invoke(app, ["analyze", str(tiny_log / "log"), "--out", str(tiny_log / "x"), "--routers", "tc",
                              "--param", "kbar=1"])
    assert res.exit_code == 2 and "--param kbar: no router of --routers" in " ".join(res.output.split())
    res = runner.invoke(app, ["analyze", "--help"], env={"COLUMNS": "200"})
    assert all(n in " ".join(res.output.split()) for n in NAMES)


# ----------------------------------------------------------------------------- the partial protocol
def _partials():
    rng = np.random.default_rng(0)
    z = [rng.standard_normal((5, 4)) for _ in range(3)]
    p = [np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in z]
    m = [x >= np.sort(x, axis=1)[:, [2]] for x in p]
    cfgs = (RouterConfig("tc", 2), RouterConfig("ec", 2), RouterConfig("usmoe", 2, kbar=1.5))
    out = {
        "load": (lambda: LoadPartial.empty(4, top_k=2), [lambda a, i=i: a.update(m[i], p[i], z[i]) for i in range(3)]),
        "collapse": (lambda: CollapsePartial.empty(4), [lambda a, i=i: a.update(z[i], p[i]) for i in range(3)]),
        "margins": (lambda: MarginPartial.empty(2), [lambda a, i=i: a.update(p[i]) for i in range(3)]),
        "counterfactual": (lambda: CounterfactualPartial.empty(4, cfgs, lp_sample=0),
                           [lambda a, i=i: a.update(torch.from_numpy(z[i])) for i in range(3)]),
        "leakage": (lambda: LeakagePartial.empty("ec", k=2), [lambda a, i=i: a.update(p[i]) for i in range(3)]),
    }
    info = LayerInfo("l0", num_experts=4, top_k=2, score_function="softmax")
    out["native"] = (lambda: NativeAgreementPartial.empty(4),
                     [lambda a, i=i: a.update(z[i], m[i] if i != 1 else ~m[i], info) for i in range(3)])
    return out


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("kind", ["load", "collapse", "margins", "counterfactual", "leakage", "native"])
def test_partials_follow_the_protocol_and_merge_associatively(kind):
    parts = _partials()
    spec = parts[kind]
    if not isinstance(spec, tuple):  # a class only: the protocol check
        assert isinstance(spec, type) and issubclass(spec, Partial)
        return
    make, feeds = spec
    chunks = []
    for feed in feeds:
        a = make()
        feed(a)
        chunks.append(a)
    assert all(isinstance(a, Partial) for a in chunks)
    assert not isinstance(object(), Partial)
    left = chunks[0].merge(chunks[1]).merge(chunks[2]).result()
    right = chunks[0].merge(chunks[1].merge(chunks[2])).result()
    _close(left.to_dict(), right.to_dict())
    whole = make()
    for feed in feeds:
        feed(whole)
    _close(left.to_dict(), whole.result().to_dict())
