"""usmoe_lp.live.route on tiny random-weight Mixtral and OLMoE models, each behaviour against an independent oracle.

* Routed forwards equal a hand-written MoE forward: the model's own embeddings, attention and norms, each MoE block
  computed by hand from its expert tensors (``gate_up_proj``, ``down_proj``, SiLU), the experts chosen by
  :func:`usmoe_lp.routing.global_topc` on the unified score written out from its definition (arXiv 2503.22996,
  Def. 3.2) of the router logits captured inside the route, and the combine weights of each rule computed by hand.
* ``replay`` of a captured log reproduces the captured run bitwise; capture inside (or around) a route logs the
  routing that was applied; padding takes no budget (a padded row equals the row alone).
* Decode steps of ``generate()`` follow each router's decode rule, checked against the router run offline on the
  logits the route saw (usmoe: Token Choice with round_half_up(kbar); causal_topc: the routing of the whole
  sequence; a router without a decode rule: each token a sequence of one); a stateful router carries its state.
* Callables, LiveContext, and the errors; hooks removed after an exception.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_capture_families import PAD, B, E, K, T, V, padded_batch, tiny_model

from usmoe_lp.errors import InvalidParameter, ShapeMismatch
from usmoe_lp.live import LiveContext, RouteFailed, Selection, route
from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import capture
from usmoe_lp.routers import reroute
from usmoe_lp.routing import Routing, global_topc

KBAR, ALPHA = 1.5, 0.3
NEW = 4  # generated tokens


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(mt: str):
        if mt not in cache:
            cache[mt] = tiny_model(mt)
        return cache[mt]
    return get


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _unified(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * 2 sigmoid(z) / N + (1 - alpha) softmax(z), float64 (arXiv 2503.22996, Def. 3.2), written out."""
    z = z.double()
    return alpha * 2.0 * torch.sigmoid(z) / z.shape[-1] + (1.0 - alpha) * torch.softmax(z, dim=-1)


def _hand_weights(rule: str, z: torch.Tensor, mask: torch.Tensor, alpha: float, norm: bool) -> torch.Tensor:
    """Combine weights of the selected experts, by hand: ``model`` the softmax probability (float32, as the model),
    over the selected ones' sum when the model normalises; ``score`` the unified score; ``reference`` the unified
    score over its sum on all N experts when the model normalises (the official USMoE code)."""
    if rule == "model":
        p = torch.softmax(z.float(), dim=-1) * mask
        if norm:
            total = p.sum(-1, keepdim=True)
            p = p / torch.where(total > 0, total, torch.ones_like(total))
        return p
    u = _unified(z, alpha)
    if rule == "score":
        return u * mask
    return u * mask / (u.sum(-1, keepdim=True) if norm else 1.0)


def _hand_experts(experts, h: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over the selected j of w_ij * down_j(silu(gate_j h_i) * up_j h_i), pair by pair. h (n, d), mask (n, N)."""
    out = torch.zeros_like(h)
    for i, j in mask.nonzero().tolist():
        gate, up = (experts.gate_up_proj[j] @ h[i]).chunk(2)
        out[i] += w[i, j].to(h.dtype) * (experts.down_proj[j] @ (F.silu(gate) * up))
    return out


def _routed(model, batch, router, **kw):
    """(output logits, stats, router logits captured inside the route: per layer a list of (B*T, N) per forward)."""
    captured = [[] for _ in model.model.layers]
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: captured[i].append(o[0].detach().clone()))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad(), route(model, router, **kw) as r:
            out = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    return out, r.stats, captured


def _hand(model, batch, captured, choose):
    """The model's forward with every MoE block by hand: ``choose(z (B, T, N), padding (B, T))`` -> (mask,
    weights), z the router logits the route saw; the block's own logits are checked against them."""
    layers = model.model.layers
    pad = batch["attention_mask"] == 0
    chosen = []

    def block_forward(i, block):
        def forward(hidden_states):
            b, t, d = hidden_states.shape
            h = hidden_states.reshape(-1, d)
            z = captured[i][0]
            real = ~pad.reshape(-1)
            torch.testing.assert_close(h[real] @ block.gate.weight.T, z[real], atol=1e-4, rtol=1e-4)
            mask, w = choose(z.reshape(b, t, -1), pad)
            chosen.append(mask)
            return _hand_experts(block.experts, h, mask.reshape(b * t, -1), w.reshape(b * t, -1)).reshape(b, t, d)
        return forward

    for i, layer in enumerate(layers):
        layer.mlp.forward = block_forward(i, layer.mlp)
    try:
        with torch.no_grad():
            out = model(**batch).logits
    finally:
        for layer in layers:
            del layer.mlp.forward
    return out, chosen


def _set_norm(model, value: bool) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.norm_topk_prob = value


# ----------------------------------------------------------------------------- 1. the hand-written MoE forward
@pytest.mark.parametrize("rule", ["model", "score", "reference"])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "olmoe_norm"])
def test_usmoe_equals_hand_written_moe_forward(models, family, scope, rule):
    mt = family.split("_")[0]
    model = models(mt)
    norm = mt == "mixtral" or family == "olmoe_norm"  # Mixtral normalises over the selected; OLMoE per config
    if mt == "olmoe":
        assert model.config.norm_topk_prob is False
        _set_norm(model, norm)
    try:
        batch = padded_batch(mt)
        out, stats, captured = _routed(model, batch, "usmoe", kbar=KBAR, alpha=ALPHA, scope=scope, weights=rule)

        def choose(z, pad):
            mask = global_topc(_unified(z, ALPHA), kbar=KBAR, scope=scope, padding_mask=pad).mask
            return mask, _hand_weights(rule, z, mask, ALPHA, norm)
        hand, chosen = _hand(model, batch, captured, choose)
    finally:
        _set_norm(model, False) if mt == "olmoe" else None
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], hand[real], atol=2e-5, rtol=1e-4)
    # the stats count the hand selection's pairs and experts per token over real tokens only
    n_real = B * T - PAD
    budget = ([_round_half_up(KBAR * T), _round_half_up(KBAR * (T - PAD))] if scope == "sequence"
              else [_round_half_up(KBAR * n_real)])
    for s, mask in zip(stats.layers, chosen, strict=True):
        assert s.tokens == n_real and s.decode_tokens == 0
        assert s.pairs == int(mask.sum()) == sum(budget)
        counts = mask.sum(-1)[real]
        assert s.histogram.tolist() == torch.bincount(counts, minlength=E + 1).tolist()
        assert s.rows_computed == s.pairs  # only the selected pairs were computed


def test_hand_forward_tells_the_rules_apart(models):
    """The oracle discriminates: the model rule's hand forward does not reproduce the score rule's route (the
    second layer's router logits already differ, and so do the outputs)."""
    model = models("mixtral")
    batch = padded_batch("mixtral")
    out, _, captured = _routed(model, batch, "usmoe", kbar=KBAR, alpha=ALPHA, weights="score")

    def choose(z, pad):
        mask = global_topc(_unified(z, ALPHA), kbar=KBAR, padding_mask=pad).mask
        return mask, _hand_weights("model", z, mask, ALPHA, True)
    real = batch["attention_mask"].bool()
    with pytest.raises(AssertionError):
        hand, _ = _hand(model, batch, captured, choose)
        torch.testing.assert_close(out[real], hand[real], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- 2. replay
def _full_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, V, (B, T), generator=g), "attention_mask": torch.ones(B, T, dtype=torch.long)}


@pytest.mark.parametrize("mt", ["mixtral", "olmoe"])
def test_replay_reproduces_the_captured_run_bitwise(models, mt, tmp_path):
    model = models(mt)
    batches = [_full_batch(10), _full_batch(11)]
    with torch.no_grad(), capture(model, tmp_path / "log", fsync=False):
        plain = [model(**b).logits for b in batches]
    with torch.no_grad(), route(model, "replay", log=tmp_path / "log") as r:
        replayed = [model(**b).logits for b in batches]
    for a, b in zip(plain, replayed, strict=True):
        assert torch.equal(a, b)
    assert r.stats.tokens == 2 * B * T and r.stats.layers[0].pairs == 2 * B * T * K
    assert r.label == "replay"

    log = RouterLog.open(tmp_path / "log")
    with torch.no_grad(), route(model, "replay", log=log):  # token ids differ from the log's: refused
        with pytest.raises(ShapeMismatch, match="router log has"):
            model(**batches[1])
    with torch.no_grad(), route(model, "replay", log=log):  # past the end of the log: refused
        model(**batches[0])
        model(**batches[1])
        with pytest.raises(ShapeMismatch, match="more real tokens"):
            model(**batches[0])


# ----------------------------------------------------------------------------- 3. capture inside the route
@pytest.mark.parametrize("outer", ["route", "capture"])
def test_capture_logs_the_routing_the_route_applied(models, outer, tmp_path):
    model = models("mixtral")
    batches = [padded_batch("mixtral"), _full_batch(12)]
    routing = route(model, "usmoe", kbar=KBAR, alpha=ALPHA, scope="batch")
    cap = capture(model, tmp_path / "log", fsync=False)
    first, second = (routing, cap) if outer == "route" else (cap, routing)
    with torch.no_grad(), first, second:
        for b in batches:
            model(**b)
    log = RouterLog.open(tmp_path / "log")
    assert log.complete and log.num_tokens == 2 * B * T - PAD
    n1 = B * T - PAD
    for name in log.layers:
        chunk = log.read(name, 0, log.num_tokens)
        # every forward as an (n, N) mask: tokens have 0..N experts
        assert chunk.selected.dtype == torch.bool and chunk.selected.shape == (log.num_tokens, E)
        for lo, hi in ((0, n1), (n1, log.num_tokens)):  # scope batch: one group per forward
            z = chunk.logits[lo:hi]
            mask = global_topc(_unified(z, ALPHA), kbar=KBAR, scope="batch").mask
            assert torch.equal(chunk.selected[lo:hi], mask)
            torch.testing.assert_close(chunk.weights[lo:hi], _hand_weights("model", z, mask, ALPHA, True),
                                       atol=1e-6, rtol=1e-5)
        assert routing.stats[name].pairs == int(chunk.selected.sum())


# ----------------------------------------------------------------------------- 4. padding
def test_padding_takes_no_budget(models):
    model = models("mixtral")
    batch = padded_batch("mixtral")
    with torch.no_grad():
        with route(model, "usmoe", kbar=KBAR, scope="sequence") as r:
            out = model(**batch).logits
        outs = []
        for b, start in ((0, 0), (1, PAD)):  # each row alone, without its padding
            ids = batch["input_ids"][b:b + 1, start:]
            with route(model, "usmoe", kbar=KBAR, scope="sequence") as alone:
                outs.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0])
            assert alone.stats.layers[0].pairs == _round_half_up(KBAR * (T - start))
    torch.testing.assert_close(out[0], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, PAD:], outs[1], atol=1e-5, rtol=1e-4)
    for s in r.stats.layers:
        assert s.tokens == B * T - PAD
        assert s.pairs == _round_half_up(KBAR * T) + _round_half_up(KBAR * (T - PAD))  # not round(1.5 * 10) twice
        assert int(s.histogram.sum()) == B * T - PAD


# ----------------------------------------------------------------------------- 5. decode steps
def _generate(model, batch):
    return model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _sequences(log, name):
    """sequence id -> (logits (t, N), selected (t, N) bool, positions) in position order."""
    chunk = log.read(name, 0, log.num_tokens)
    out = {}
    for sid in chunk.sequence_ids.unique().tolist():
        rows = (chunk.sequence_ids == sid).nonzero()[:, 0]
        rows = rows[torch.argsort(chunk.positions[rows])]
        out[sid] = (chunk.logits[rows], chunk.selected[rows], chunk.positions[rows])
    return out


def _generate_routed(model, tmp_path, router, **params):
    batch = padded_batch("mixtral")
    with torch.no_grad(), route(model, router, **params) as r, capture(model, tmp_path / "log", fsync=False):
        out = _generate(model, batch)
    assert out.shape == (B, T + NEW)
    return r, RouterLog.open(tmp_path / "log"), batch


def test_usmoe_decode_steps_take_round_half_up_kbar_experts(models, tmp_path):
    model = models("mixtral")
    kbar = 2.6  # round_half_up: 3 experts per generated token, not the model's k = 2
    r, log, batch = _generate_routed(model, tmp_path, "usmoe", kbar=kbar, alpha=ALPHA)
    prompt = batch["attention_mask"].sum(1).tolist()
    for name in log.layers:
        for sid, (z, sel, pos) in _sequences(log, name).items():
            assert pos.tolist() == list(range(prompt[sid] + NEW - 1))
            decode = pos >= prompt[sid]
            u = _unified(z[decode], ALPHA)
            expected = torch.zeros_like(sel[decode])
            expected.scatter_(1, torch.topk(u, 3, dim=-1).indices, True)
            assert torch.equal(sel[decode], expected)  # Token Choice with 3 experts on the unified score
            # the prompt: the global top-c of the sequence
            prompt_mask = global_topc(_unified(z[~decode], ALPHA), kbar=kbar).mask
            assert torch.equal(sel[~decode], prompt_mask)
    for s in r.stats.layers:
        assert s.decode_tokens == B * (NEW - 1)
        assert s.tokens == B * (T + NEW - 1) - PAD
        assert s.pairs == (_round_half_up(kbar * T) + _round_half_up(kbar * (T - PAD)) + 3 * B * (NEW - 1))


def test_causal_topc_decode_steps_are_the_causal_routing_of_the_sequence(models, tmp_path):
    model = models("mixtral")
    r, log, _ = _generate_routed(model, tmp_path, "causal_topc", kbar=KBAR, alpha=ALPHA)
    for name in log.layers:
        for sid, (z, sel, _) in _sequences(log, name).items():
            full = reroute(z, "causal_topc", k=K, kbar=KBAR, alpha=ALPHA).mask  # the whole sequence at once
            assert torch.equal(sel, full), (name, sid)
    assert r.stats.layers[0].decode_tokens == B * (NEW - 1)


def test_router_without_decode_rule_routes_each_new_token_alone(models, tmp_path):
    model = models("mixtral")
    _, log, batch = _generate_routed(model, tmp_path, "ec")
    prompt = batch["attention_mask"].sum(1).tolist()
    for name in log.layers:
        for sid, (z, sel, pos) in _sequences(log, name).items():
            decode = pos >= prompt[sid]
            for row, got in zip(z[decode], sel[decode], strict=True):
                assert torch.equal(got, reroute(row[None], "ec", k=K).mask[0])
            # EC on a sequence of one token: every expert takes it
            assert bool(sel[decode].all())
            assert torch.equal(sel[~decode], reroute(z[~decode], "ec", k=K).mask)


def test_stateful_router_carries_its_state_across_forwards(models, tmp_path):
    model = models("mixtral")
    batches = [padded_batch("mixtral"), _full_batch(13), _full_batch(14)]
    gamma = 0.05
    with torch.no_grad(), route(model, "aux_free_bias", gamma=gamma) as r, \
            capture(model, tmp_path / "log", fsync=False):
        for b in batches:
            model(**b)
    log = RouterLog.open(tmp_path / "log")
    sizes = [B * T - PAD, B * T, B * T]
    for name in log.layers:
        chunk = log.read(name, 0, log.num_tokens)
        state, lo, moved = None, 0, False
        for n in sizes:
            expected = reroute(chunk.logits[lo:lo + n], "aux_free_bias", k=K, gamma=gamma, state=state)
            assert torch.equal(chunk.selected[lo:lo + n], expected.mask)
            fresh = reroute(chunk.logits[lo:lo + n], "aux_free_bias", k=K, gamma=gamma)  # state not carried
            moved = moved or not torch.equal(fresh.mask, expected.mask)
            state, lo = expected.params["state"], lo + n
        assert moved  # the carried bias changed some selection, so the comparison can fail
    assert r.stats.tokens == sum(sizes)


def test_stateful_router_decodes_with_the_carried_state(models, tmp_path):
    """In generate(), aux_free_bias decodes each new token with the bias its prompt forward left (frozen at decode
    time): the top-k of the token's probabilities + that bias, recomputed from the captured decode logits; the
    initial bias would select otherwise (so the check can fail)."""
    model = models("mixtral")
    batch = padded_batch("mixtral")
    gamma = 0.5  # a large step: the carried bias differs visibly from the initial one
    with torch.no_grad(), route(model, "aux_free_bias", gamma=gamma) as r, \
            capture(model, tmp_path / "log", fsync=False):
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    log = RouterLog.open(tmp_path / "log")
    prompt = int(batch["attention_mask"].sum())
    for name in log.layers:
        chunk = log.read(name, 0, log.num_tokens)
        state = reroute(chunk.logits[:prompt], "aux_free_bias", k=K, gamma=gamma).params["state"]
        probs = torch.softmax(chunk.logits[prompt:].double(), dim=-1)
        carried = torch.topk(probs + torch.as_tensor(state), K, dim=-1).indices
        initial = torch.topk(probs, K, dim=-1).indices
        want = torch.zeros_like(chunk.selected[prompt:]).scatter_(1, carried, True)
        assert torch.equal(chunk.selected[prompt:], want), name
        assert not torch.equal(want, torch.zeros_like(want).scatter_(1, initial, True)), name
    assert r.stats.layers[0].decode_tokens == chunk.logits.shape[0] - prompt == 2 * 3


# ----------------------------------------------------------------------------- 6. callables and LiveContext
def test_callables_mask_pair_and_routing(models):
    model = models("mixtral")
    batch = padded_batch("mixtral")
    pad = batch["attention_mask"] == 0

    def top1(z, ctx):  # a bool mask: the model's rule weighs it
        m = torch.zeros(z.shape, dtype=torch.bool)
        return m.scatter_(-1, z.argmax(-1, keepdim=True), True)

    def pair(z, ctx):  # (mask, weights): weights="score" applies them as they are
        w = torch.sigmoid(z.double())
        return top1(z, ctx) | (w > 0.6), w

    def as_routing(z, ctx):
        m, w = pair(z, ctx)
        return Routing(mask=m, weights=torch.where(m, w, torch.zeros_like(w)), router="mine")

    cases = [(top1, "model", lambda z, m: _hand_weights("model", z, m, 0, True)),
             (pair, "score", lambda z, m: torch.sigmoid(z.double()) * m),
             (as_routing, "score", lambda z, m: torch.sigmoid(z.double()) * m)]
    for fn, rule, weigh in cases:
        out, stats, captured = _routed(model, batch, fn, weights=rule)

        def choose(z, p, fn=fn, weigh=weigh):
            m, _ = pair(z, None) if fn is not top1 else (top1(z, None), None)
            m = m & ~p.unsqueeze(-1)
            return m, weigh(z, m)
        hand, chosen = _hand(model, batch, captured, choose)
        real = ~pad
        torch.testing.assert_close(out[real], hand[real], atol=2e-5, rtol=1e-4)
        assert stats.layers[0].pairs == int(chosen[0].sum())  # padding dropped from the callable's mask


def test_callable_errors(models):
    model = models("mixtral")
    batch = padded_batch("mixtral")
    bad = {"wrong shape": lambda z, ctx: torch.zeros(z.shape[0], z.shape[1], dtype=torch.bool),
           "not bool": lambda z, ctx: torch.zeros(z.shape),
           "weights shape": lambda z, ctx: (torch.ones(z.shape, dtype=torch.bool), torch.ones(3)),
           "weights type": lambda z, ctx: (torch.ones(z.shape, dtype=torch.bool), [1.0])}
    for fn in bad.values():
        with torch.no_grad(), route(model, fn), pytest.raises(ShapeMismatch, match="must return|weights of shape"):
            model(**batch)
    with torch.no_grad(), route(model, lambda z, ctx: torch.ones(z.shape, dtype=torch.bool), weights="score"):
        with pytest.raises(InvalidParameter, match="needs the router's scores"):
            model(**batch)
    with pytest.raises(InvalidParameter, match="takes no k="):
        route(model, lambda z, ctx: z > 0, kbar=1.5)


def test_live_context_carries_padding_sequences_positions_and_decode_step(models):
    model = models("mixtral")
    batch = padded_batch("mixtral")
    seen: list[LiveContext] = []

    def spy(z, ctx):
        if ctx.layer.name == "layer0":
            seen.append(ctx)
        return torch.ones(z.shape, dtype=torch.bool)

    with torch.no_grad(), route(model, spy) as r:
        model(**batch)
        _generate(model, batch)
    mask = batch["attention_mask"].bool()
    first = seen[0]
    assert first.layer.num_experts == E and first.layer.top_k == K
    assert torch.equal(first.real, mask) and torch.equal(first.padding_mask, ~mask)
    assert first.sequence_ids.tolist() == [0, 1] and first.decode_step is False
    assert first.positions[0].tolist() == list(range(T))
    assert first.positions[1, PAD:].tolist() == list(range(T - PAD))
    assert torch.equal(first.token_ids, batch["input_ids"])
    prefill, steps = seen[1], seen[2:]
    assert prefill.sequence_ids.tolist() == [2, 3] and not prefill.decode_step  # generate's prompt: new sequences
    assert len(steps) == NEW - 1
    for i, ctx in enumerate(steps):
        assert ctx.decode_step and ctx.real.shape == (B, 1) and ctx.padding_mask is None
        assert ctx.sequence_ids.tolist() == [2, 3]
        assert ctx.positions[:, 0].tolist() == [T + i, T - PAD + i]
    assert r.stats.layers[0].decode_tokens == B * (NEW - 1)
    assert r.label == "spy"


# ----------------------------------------------------------------------------- 7. errors and clean-up
def test_errors_up_front(models):
    model = models("mixtral")
    with pytest.raises(InvalidParameter, match="unknown router 'bogus'"):
        route(model, "bogus")
    with pytest.raises(InvalidParameter, match="kbar is a parameter of usmoe, causal_topc"):
        route(model, "tc", kbar=1.5)
    with pytest.raises(InvalidParameter, match="exceeds the number of experts N = 8"):
        route(model, "usmoe", kbar=E + 0.5)
    with pytest.raises(InvalidParameter, match="needs log="):
        route(model, "replay")
    with pytest.raises(InvalidParameter, match="weights must be one of model, reference, score"):
        route(model, "usmoe", weights="bogus")
    with pytest.raises(InvalidParameter, match="leave weights=\"model\""):
        route(model, "replay", log="nowhere", weights="score")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        route("model", "usmoe")


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_router_outside_a_forward_and_nested_use_raise(models):
    model = models("mixtral")
    batch = padded_batch("mixtral")
    hidden = torch.randn(1, 3, model.config.hidden_size)
    calls = {"n": 0}

    def fails_once(z, ctx):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return torch.ones(z.shape, dtype=torch.bool)

    r = route(model, fails_once)
    with torch.no_grad(), r:
        with pytest.raises(RouteFailed, match="ran outside a forward"):
            model.model.layers[0].mlp(hidden)
        with pytest.raises(ValueError, match="boom"):
            model(**batch)
        with pytest.raises(RouteFailed, match="ran outside a forward"):  # no stale tokens of the failed forward
            model.model.layers[0].mlp(hidden)
        model(**batch)  # the next forward routes
        with pytest.raises(RouteFailed, match="entered once"):
            with r:
                pass
        with pytest.raises(RouteFailed, match="already routed by another route"):  # one route at a time
            with route(model, "tc"):
                pass
        model(**batch)  # the refused route left r's hooks in place
    assert r.stats.tokens == 2 * (B * T - PAD)
    with torch.no_grad(), route(model, "tc") as after:  # free again once r has exited
        model(**batch)
    assert after.stats.tokens == B * T - PAD


def test_hooks_removed_after_an_exception(models):
    model = models("mixtral")
    batch = padded_batch("mixtral")
    hooks = _hooks(model)
    with torch.no_grad():
        plain = model(**batch).logits
        with pytest.raises(KeyError, match="inside"):
            with route(model, "usmoe", kbar=KBAR) as r:
                routed = model(**batch).logits
                raise KeyError("inside")
        assert not torch.equal(routed, plain) and r.stats.tokens == B * T - PAD
        assert _hooks(model) == hooks
        assert all("forward" not in layer.mlp.experts.__dict__ for layer in model.model.layers)
        assert torch.equal(model(**batch).logits, plain)
        # an exception raised inside a forward (the router's) too
        with pytest.raises(RouteFailed), route(model, "usmoe", kbar=KBAR):
            model.model.layers[0].mlp(torch.randn(1, 3, model.config.hidden_size))
        assert _hooks(model) == hooks
        assert torch.equal(model(**batch).logits, plain)


def test_native_is_the_unpatched_model_bitwise(models):
    for mt in ("mixtral", "olmoe"):
        model = models(mt)
        batch = padded_batch(mt)
        with torch.no_grad():
            plain = model(**batch).logits
            with route(model, "native") as r:
                native = model(**batch).logits
        assert torch.equal(plain, native)
        full = _full_batch(15)
        with torch.no_grad():
            plain = model(**full).logits
            with route(model, "tc") as tc:  # Token Choice with the model's weights, no padding: the model itself
                assert torch.equal(model(**full).logits, plain)
            with route(model, "tc") as tc:
                model(**batch)
        assert tc.stats.layers[0].rows_computed == K * (B * T - PAD)  # padding computes nothing
        for s in r.stats.layers:
            assert s.native_mismatches == 0 and s.pairs == K * (B * T - PAD)
            assert s.rows_computed == K * B * T  # the model's experts also run its padding


def test_native_check_counts_tokens_whose_experts_differ(models):
    """native's check can fail: a replay whose experts are shifted by one differs from the model's on every real
    token, while the model's own selection still runs."""
    model = models("mixtral")
    batch = padded_batch("mixtral")
    r = route(model, "native")
    replay = r.selector.select

    def shifted(z, ctx):
        sel = replay(z, ctx)
        return Selection(mask=sel.mask.roll(1, dims=-1), scores=sel.scores, native=True)
    r.selector.select = shifted
    with torch.no_grad():
        plain = model(**batch).logits
        with r:
            out = model(**batch).logits
    assert torch.equal(out, plain)
    for s in r.stats.layers:
        assert s.native_mismatches == B * T - PAD
