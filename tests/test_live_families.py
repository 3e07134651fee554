"""route() on tiny random-weight models of every transformers MoE family that capture supports.

For each family (tests/test_capture_families.py: FAMILIES and OTHER_FAMILIES, both stacks of the encoder-decoder
ones), on a left-padded batch:

* ``native`` is the unpatched model, bitwise, in a forward and in greedy ``generate()`` (KV-cache decode steps;
  the decoder of a seq2seq model), with no token whose registry replay differs from the model's own selection;
* ``tc`` at the model's k selects what the model selects and gives its output (allclose) wherever the model's
  router is a plain top-k (from its LayerInfo: no selection bias, no group limit, no capacity that can bind);
* the expert rows computed, counted by an independent probe on the model's own modules (the experts' activation,
  each expert module, JetMoE's expert projections), equal ``stats.rows_computed``: the selected pairs for
  ``usmoe`` at kbar = 1 (tokens get 0..N experts), what the model computes for ``native``;
* ``usmoe`` at kbar = 1 gives each sequence exactly round_half_up(kbar x its real tokens) pairs, padding none.

The blocks whose experts are a dict of modules (Switch, NLLB-MoE), routed with k = 2, with and without padding, give
the sum of the selected experts' outputs computed by hand from the block's input. NLLB-MoE's own experts call
(transformers 5.x) runs its experts by the values of its 0/1 dispatch mask, not the experts its router selects, so
its native output is not that sum (and tc is not compared with native there). JetMoE's attention experts refuse a
token with more than top_k experts (usmoe routes JetMoE's MLP routers).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from test_capture_families import FAMILIES, OTHER_FAMILIES, SEQ2SEQ, padded_batch, tiny_model

from usmoe_lp._validate import round_half_up
from usmoe_lp.live import UnsupportedModel, route
from usmoe_lp.logs.capture import find_routers

ALL = list(FAMILIES) + list(OTHER_FAMILIES)
NEW_TOKENS = 3


@functools.cache
def model_of(mt: str):
    return tiny_model(mt)


def forward(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def generate(model, batch):
    kwargs = {k: v for k, v in batch.items() if not k.startswith("decoder_")}
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def record(r) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Every selection route ``r``'s selector makes: (layer, (B, T, N) mask, (B, T) real)."""
    seen, select = [], r.selector.select

    def recording(logits, ctx):
        selection = select(logits, ctx)
        seen.append((ctx.layer.name, selection.mask.cpu(), ctx.real.cpu()))
        return selection
    r.selector.select = recording
    return seen


# ----------------------------------------------------------------------------- the probe
def _count(counter: list[int], x: torch.Tensor) -> None:
    counter[0] += x.numel() // x.shape[-1] if x.ndim else 1


@contextlib.contextmanager
def rows_probe(model, r, zero_experts: bool = False):
    """Count the expert rows the model's own modules compute while the context is open (``counter[0]``): each
    expert module's input (Switch, NLLB-MoE), JetMoE's expert input projection, else the experts' activation
    (called once per computed row of every expert, in the eager loop and the grouped implementation alike;
    GPT-OSS: its gate). LongCat-Flash: its routed experts' activation, and with ``zero_experts`` the rows its
    zero-computation (identity) experts pass on as well."""
    counter, undo, seen = [0], [], set()

    def hook_module(module):
        if id(module) not in seen:
            seen.add(id(module))
            undo.append(module.register_forward_pre_hook(lambda m, args: _count(counter, args[0])).remove)

    def wrap(owner, attr):
        fn = getattr(owner, attr)
        if isinstance(fn, torch.nn.Module):
            return hook_module(fn)

        def counted(x, *a, **kw):
            _count(counter, x)
            return fn(x, *a, **kw)
        had = owner.__dict__.get(attr)  # LFM2-MoE sets act_fn (a function) on the instance
        owner.__dict__[attr] = counted
        undo.append(lambda: owner.__dict__.pop(attr) if had is None else owner.__dict__.update({attr: had}))

    for layer in r.layers:
        block = layer.block
        experts = getattr(block, "experts", None)
        if isinstance(experts, torch.nn.ModuleDict):  # Switch, NLLB-MoE: expert_0 ... expert_{N-1}
            for module in experts.values():
                hook_module(module)
        elif hasattr(block, "input_linear"):  # JetMoE (MLP and attention experts)
            hook_module(block.input_linear)
        elif hasattr(experts, "act_fn"):
            wrap(experts, "act_fn")
            if zero_experts and hasattr(experts, "identity_expert"):  # LongCat-Flash
                hook_module(experts.identity_expert)
        elif hasattr(getattr(experts, "mlp", None), "activation_fn"):  # DBRX
            wrap(experts.mlp, "activation_fn")
        elif hasattr(experts, "_apply_gate"):  # GPT-OSS
            wrap(experts, "_apply_gate")
        else:
            raise AssertionError(f"no probe for {type(block).__name__}")
    try:
        yield counter
    finally:
        for u in reversed(undo):
            u()


def routed_columns(model, n: int) -> int:
    """Experts that compute (LongCat-Flash's zero-computation experts are columns n_routed..N-1)."""
    return getattr(model.config, "n_routed_experts", n) if model.config.model_type == "longcat_flash" else n


def usmoe_layers(model) -> str | list[str]:
    """JetMoE's attention experts take at most top_k experts per token: usmoe routes its MLP routers there."""
    if model.config.model_type != "jetmoe":
        return "auto"
    return [s.name for s in find_routers(model) if ".mlp." in s.path]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mt", ALL)
def test_native_is_the_model(mt):
    model, batch = model_of(mt), padded_batch(mt)
    plain, plain_ids = forward(model, batch), generate(model, batch)
    with route(model, "native") as r, rows_probe(model, r, zero_experts=True) as rows:
        out = forward(model, batch)
    assert torch.equal(out, plain)
    stats = r.stats
    real = int(batch["attention_mask"].sum())
    for s in stats.layers:
        assert s.native_mismatches == 0, s.layer
        assert s.tokens == (batch["decoder_input_ids"].numel() if s.layer.startswith("decoder.") else real)
        assert s.pairs == s.tokens * s.k
    assert stats.layers and rows[0] == sum(s.rows_computed for s in stats.layers)
    with route(model, "native") as r:
        ids = generate(model, batch)
    assert torch.equal(ids, plain_ids)
    decoder = [s for s in r.stats.layers if not s.layer.startswith("encoder.")]
    assert decoder and all(s.native_mismatches == 0 and s.decode_tokens == 2 * (NEW_TOKENS - 1) for s in decoder)


def plain_topk(info, tokens_per_row: int) -> bool:
    """The model's router takes the top-k of a score without bias, group limit or a capacity that can bind."""
    return (info.selection in ("softmax", "sigmoid", "logits") and not info.group_limited
            and not any(info.selection_bias or ())
            and (info.expert_capacity is None or info.expert_capacity >= tokens_per_row))


@pytest.mark.parametrize("mt", [m for m in ALL if m != "nllb-moe"])  # NLLB-MoE: see below
def test_tc_is_native_for_plain_topk(mt):
    model, batch = model_of(mt), padded_batch(mt)
    with route(model, "native") as r:
        native_sel = record(r)
        native = forward(model, batch)
    layers = [lay.info for lay in r.layers if plain_topk(lay.info, batch["input_ids"].shape[1])]
    if not layers:
        assert mt in ("deepseek_v3", "deepseek_v32")  # group-limited: only these among the tiny models
        pytest.skip(f"{mt}: its router is group-limited")
    every = len(layers) == len(r.layers)
    with route(model, "tc", layers="auto" if every else [i.name for i in layers]) as r, \
            rows_probe(model, r) as rows:
        tc_sel = record(r)
        out = forward(model, batch)
    chosen = {i.name for i in layers}
    native_sel = [s for s in native_sel if s[0] in chosen]
    assert len(tc_sel) == len(native_sel) == len(layers)
    for (name, mask, real), (name0, mask0, _) in zip(tc_sel, native_sel, strict=True):
        assert name == name0 and torch.equal(mask & real[..., None], mask0 & real[..., None]), name
    if every:
        torch.testing.assert_close(out, native, rtol=1e-4, atol=1e-5)
    assert rows[0] == sum(int(mask[..., :routed_columns(model, mask.shape[-1])].sum()) for _, mask, _ in tc_sel)
    assert sum(s.pairs for s in r.stats.layers) == sum(s.rows_computed for s in r.stats.layers)


@pytest.mark.parametrize("mt", ALL)
def test_usmoe_pairs_are_the_rows_computed(mt):
    model, batch = model_of(mt), padded_batch(mt)
    with route(model, "usmoe", kbar=1.0, layers=usmoe_layers(model)) as r, rows_probe(model, r) as rows:
        seen = record(r)
        forward(model, batch)
    stats = r.stats
    n = stats.layers[0].num_experts
    cols = routed_columns(model, n)
    assert len(seen) == len(stats.layers)
    for (name, mask, real), s in zip(seen, stats.layers, strict=True):
        assert not (mask & ~real[..., None]).any(), name  # padding gets no expert
        per_seq = mask.sum(dim=(1, 2)).tolist()
        assert per_seq == [round_half_up(1.0 * int(t)) for t in real.sum(dim=1)], name
        assert s.pairs == sum(per_seq)
    assert rows[0] == sum(int(mask[..., :cols].sum()) for _, mask, _ in seen)
    assert sum(s.rows_computed for s in stats.layers) == sum(s.pairs for s in stats.layers)
    hist = sum(s.histogram for s in stats.layers)
    assert hist[0] > 0 and hist[2:].sum() > 0  # some tokens get no expert, some several
    # decode steps: a token per row per step, routed by usmoe's decode rule (round_half_up(1.0) = 1 expert)
    with route(model, "usmoe", kbar=1.0, layers=usmoe_layers(model)) as r, rows_probe(model, r) as rows:
        generate(model, batch)
    stats = r.stats
    decoder = [s for s in stats.layers if not s.layer.startswith("encoder.")]
    assert all(s.decode_tokens == 2 * (NEW_TOKENS - 1) for s in decoder)
    if cols == n:
        assert rows[0] == sum(s.pairs for s in stats.layers) == sum(s.rows_computed for s in stats.layers)


def moe_block(model):
    """The first encoder MoE block of an encoder-decoder model (Switch, NLLB-MoE)."""
    return model.get_submodule(route(model, "native").layers[0].spec.path.rsplit(".", 1)[0])


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "full"])
@pytest.mark.parametrize("mt", sorted(SEQ2SEQ))
def test_expert_dict_blocks_compute_the_selection(mt, padded):
    """Routed, a Switch or NLLB-MoE block gives sum_j w_j expert_j(h) over the selected experts (times NLLB-MoE's
    eval-time 1 - moe_token_dropout), computed here by hand from the block's input and its expert modules; k = 2,
    with padding (pairs dispatched one by one) and without (every token has k experts: one call of the module).
    NLLB-MoE's own experts call (native) is not that, and runs n N expert rows (module docstring of adapters)."""
    model, batch = model_of(mt), padded_batch(mt)
    if not padded:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    block = moe_block(model)
    io = {}
    handle = block.register_forward_hook(lambda m, args, out: io.update(h=args[0], out=out))
    try:
        with route(model, "tc", k=2, layers="encoder") as r:
            seen = record(r)
            forward(model, batch)
        routed_in, routed_out = io["h"], io["out"]
        with route(model, "native", layers="encoder") as r0:
            forward(model, batch)
        native_out = io["out"]
    finally:
        handle.remove()
    _, mask, real = seen[0]
    h = routed_in.reshape(-1, routed_in.shape[-1])
    mask = mask.reshape(-1, mask.shape[-1])
    with torch.no_grad():
        p = torch.softmax(block.router.classifier(h.to(torch.float32)), dim=-1)
        w = torch.where(mask, p, 0.0)
        if r.layers[0].info.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        expected = sum(w[:, j, None] * block.experts[f"expert_{j}"](h) for j in range(mask.shape[-1]))
    expected = expected * (1 - getattr(block.experts, "moe_token_dropout", 0.0))
    assert int(mask.sum()) == 2 * int(real.sum())
    torch.testing.assert_close(routed_out.reshape(-1, h.shape[-1]), expected, rtol=1e-4, atol=1e-6)
    s = r0.stats.layers[0]
    assert s.native_mismatches == 0
    if mt == "nllb-moe":
        assert not torch.allclose(native_out.reshape(-1, h.shape[-1]), expected, rtol=1e-3, atol=1e-4)
        assert s.rows_computed == h.shape[0] * s.num_experts


def test_jetmoe_attention_experts_take_at_most_top_k():
    model, batch = model_of("jetmoe"), padded_batch("jetmoe")
    attention = [lay.spec.name for lay in route(model, "native").layers if ".self_attention." in lay.spec.path]
    every = lambda logits, ctx: torch.ones_like(logits, dtype=torch.bool)  # noqa: E731 - all N experts
    with pytest.raises(UnsupportedModel, match="query slots"), route(model, every, layers=attention[:1]):
        forward(model, batch)
    with route(model, every, layers=usmoe_layers(model)) as r:
        forward(model, batch)
    assert all(s.pairs == s.tokens * s.num_experts for s in r.stats.layers)


@pytest.mark.parametrize("mt", sorted(SEQ2SEQ))
def test_seq2seq_routes_both_stacks(mt):
    model = model_of(mt)
    stacks = {lay.spec.stack for lay in route(model, "tc").layers}
    assert stacks == {"encoder", "decoder"}


@pytest.mark.parametrize("mt", ALL)
def test_capture_alongside_route_logs_the_routing_applied(mt, tmp_path):
    """A capture inside a route logs, as selections, the experts the route ran (not the model's own choice), on
    every family whose selections capture logs: the router's output rewritten in route's first hook, DBRX's
    experts inputs in a first pre-hook, JetMoE's sorted pairs and Llama-4's dense weights inside route's hook."""
    from usmoe_lp.logs import RouterLog, capture

    model, batch = model_of(mt), padded_batch(mt)
    layers = usmoe_layers(model)
    applied = []
    with route(model, "usmoe", kbar=1.0, layers=layers,
               on_select=lambda ctx, sel: applied.append((ctx.layer.module_path, sel.mask.cpu(), ctx.real.cpu()))):
        with capture(model, tmp_path / "log", fsync=False, layers=layers):
            forward(model, batch)
    log = RouterLog.open(tmp_path / "log")
    logged = [name for name in log.layers if log.has(name, "selected")]
    if not logged:
        pytest.skip(f"{mt}: capture logs no selections for this family")
    by_layer = {name: (mask, real) for name, mask, real in applied}
    for name in logged:
        chunk = log.read(name, 0, log.num_tokens)
        mask, real = by_layer[log.layer_info(name).module_path]
        want = mask[real]
        got = chunk.selected
        if got.dtype != torch.bool:
            n = want.shape[-1]
            index = got.long()
            got = torch.zeros(index.shape[0], n + 1, dtype=torch.bool).scatter_(1, index.clamp(max=n), True)[:, :n]
        assert torch.equal(got, want), (mt, name)
