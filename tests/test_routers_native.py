"""The registry's ``native`` router reproduces the model's own selection from the captured logits.

For every family of the capture tests (their tiny configs, imported from tests/test_capture_families.py), one
forward is captured and each layer's logged logits are re-routed with ``reroute(logits, "native", layer=info)``;
the result must equal the selection the model made on every token (ties at the selection boundary counted apart,
through :class:`NativeAgreementPartial`). The oracle is what the model itself selected: ``selected.<layer>`` of
the log (what its experts received, tests/test_capture_selections_more.py), or for NLLB-MoE (whose selection
capture leaves out) the experts its router's combine weights name. The families with a selection bias get random
biases, and the group-limited ones configs whose group limit matters (n_group > 1, topk_group < n_group).
Also: a hand-computed group-limited case, Switch's expert capacity dropping tokens, the LP program of a
group-limited layer, the combine weights against the model's, and older manifests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_capture_families import FAMILIES, OTHER_FAMILIES, SEQ2SEQ, E, T, padded_batch, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from usmoe_lp.diagnostics.native import NativeAgreementPartial, selection_mask, tie_consistent
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter
from usmoe_lp.logs.capture import capture
from usmoe_lp.logs.format import MANIFEST_NAME
from usmoe_lp.lp import certify
from usmoe_lp.routers import get_router, list_routers, reroute
from usmoe_lp.routers.entries.native import combine_weights, program_scores, selection_scores

# group-limited families: configs where the group limit decides (E = 8 experts, k = 2; a max-scored group limit
# changes a top-2 only when it keeps fewer groups than k)
GROUPED = {
    "deepseek_v2": {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
    "deepseek_v3": {"n_group": 4, "topk_group": 2}, "deepseek_v32": {"n_group": 4, "topk_group": 1},
    "glm4_moe": {"n_group": 2, "topk_group": 1}, "dots1": {"n_group": 4, "topk_group": 2},
    "exaone_moe": {"n_group": 2, "topk_group": 1},
}
BIAS_ATTRS = ("e_score_correction_bias", "expert_bias")


def _model(mt: str, **overrides):
    config = tiny_config(mt)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    cls = AutoModelForSeq2SeqLM if mt in SEQ2SEQ else AutoModelForCausalLM
    model = cls.from_config(config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random selection biases (initialised to zero), so that they change the selection
        for module in model.modules():
            for attr in BIAS_ATTRS:
                bias = getattr(module, attr, None)
                if isinstance(bias, torch.Tensor):
                    bias.copy_(0.3 * torch.randn(bias.shape, generator=g))
    return model


def _nllb_router_selections(model):
    """What NLLB-MoE's routers select: the experts with a non-zero combine weight in their output (n, N)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out[1] != 0))
               for name, m in model.named_modules() if type(m).__name__ == "NllbMoeTop2Router"]
    return seen, handles


def _agreement(log: RouterLog, oracle=None) -> dict[str, NativeAgreementPartial]:
    out = {}
    for name in log.layers:
        info = log.layer_info(name)
        chunk = log.read(name, 0, log.num_tokens)
        selected = chunk.selected if oracle is None else oracle[info.module_path]
        part = NativeAgreementPartial.empty(info.num_experts)
        part.update(chunk.logits, selected, info, sequence_ids=chunk.sequence_ids)
        out[name] = part
    return out


@pytest.mark.parametrize("mt", [*FAMILIES, *OTHER_FAMILIES])
def test_native_reproduces_the_captured_selection(mt, tmp_path):
    model = _model(mt, **GROUPED.get(mt, {}))
    batch = padded_batch(mt)
    seen, handles = _nllb_router_selections(model) if mt == "nllb-moe" else ({}, [])
    try:
        with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    log = RouterLog.open(tmp_path / "log")
    oracle = None
    if mt == "nllb-moe":
        keep = batch["attention_mask"].reshape(-1).bool()
        oracle = {path: sel.reshape(-1, E)[keep] for path, sel in seen.items() if ".encoder." in f".{path}."}
    else:
        assert log.manifest.capture["selections"] == list(log.layers), "capture records the selection"
    for name, part in _agreement(log, oracle).items():
        result = part.result()
        assert result.tokens == log.num_tokens
        assert result.agreeing_tokens + result.tied_tokens == result.tokens, (name, result)
    if mt in GROUPED:
        info = log.layer_info(log.layers[0])
        assert info.group_limited and info.group_score == ("max" if mt == "deepseek_v2" else "top2_sum")
        assert (info.n_group, info.topk_group) == (GROUPED[mt]["n_group"], GROUPED[mt]["topk_group"])


@pytest.mark.parametrize("mt", ["deepseek_v3", "deepseek_v2"])
def test_group_limits_decide_the_selection(mt, tmp_path):
    """The configs above are not vacuous: without the group limit (and the bias) the selection differs."""
    model = _model(mt, **GROUPED[mt])
    with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
        model(**padded_batch(mt))
    log = RouterLog.open(tmp_path / "log")
    name = log.layers[0]
    info, chunk = log.layer_info(name), log.read(name, 0, log.num_tokens)
    model_sel = selection_mask(chunk.selected, E)
    assert torch.equal(reroute(chunk.logits, "native", layer=info).mask, model_sel)
    ungrouped = LayerInfo(name, num_experts=E, top_k=info.top_k, score_function=info.score_function,
                          selection_bias=info.selection_bias, score_dtype=info.score_dtype)
    assert not torch.equal(reroute(chunk.logits, "native", layer=ungrouped).mask, model_sel)


def _hand_layer(**kw) -> LayerInfo:
    base = dict(num_experts=8, top_k=2, score_function="sigmoid", score_dtype="float32", n_group=4, topk_group=2,
                group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5)
    return LayerInfo("hand", **{**base, **kw})


# sigmoid scores of one token, in 4 groups of 2 experts
HAND = torch.logit(torch.tensor([[0.9, 0.1, 0.5, 0.45, 0.8, 0.05, 0.3, 0.3]], dtype=torch.float64))


def test_hand_computed_group_limited_case():
    # top2_sum: groups (0.9+0.1, 0.5+0.45, 0.8+0.05, 0.3+0.3) = (1.0, 0.95, 0.85, 0.6): groups 0 and 1 stay, so the
    # top-2 is experts 0 (0.9) and 2 (0.5), not the plain top-2 {0, 4}
    r = reroute(HAND, "native", layer=_hand_layer())
    assert r.mask.nonzero()[:, 1].tolist() == [0, 2]
    # weights: sigmoid of the selected, normalised, times 2.5: 2.5 * (0.9, 0.5) / 1.4
    torch.testing.assert_close(r.weights[0, [0, 2]], torch.tensor([2.5 * 0.9 / 1.4, 2.5 * 0.5 / 1.4],
                                                                  dtype=torch.float64), rtol=1e-6, atol=0)
    assert r.params["tied_tokens"] == 0
    # max (DeepSeek-V2's group_limited_greedy): groups (0.9, 0.5, 0.8, 0.3): groups 0 and 2, so {0, 4}
    assert reroute(HAND, "native", layer=_hand_layer(group_score="max")).mask.nonzero()[:, 1].tolist() == [0, 4]
    # no group limit: the plain top-2 {0, 4}
    assert reroute(HAND, "native", layer=_hand_layer(topk_group=None)).mask.nonzero()[:, 1].tolist() == [0, 4]
    # a selection bias of +0.5 on expert 7: group 3 scores 0.3 + 0.8 = 1.1 and leads; the top-2 of groups 3 and 0 is
    # experts 0 (0.9) and 7 (0.3 + 0.5 = 0.8); its weight is its sigmoid without the bias, 0.3
    biased = _hand_layer(selection_bias=[0.0] * 7 + [0.5])
    r = reroute(HAND, "native", layer=biased)
    assert r.mask.nonzero()[:, 1].tolist() == [0, 7]
    torch.testing.assert_close(r.weights[0, [0, 7]], torch.tensor([2.5 * 0.75, 2.5 * 0.25], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # the program: Token Choice on the scores with the dropped groups below every kept score; native is its optimum
    S = selection_scores(HAND, biased).double().numpy()
    program = get_router("native").problem(S, {}, {}, 0, _ctx(biased))
    low = program.scores[0, [2, 3, 4, 5]]
    assert (low < program.scores[0, [0, 1, 6, 7]].min()).all()
    assert certify(program, r.mask.numpy()).optimal
    assert np.array_equal(program_scores(S, _hand_layer(topk_group=None)), S)  # no group limit: the scores


def _ctx(layer):
    from usmoe_lp.routers import RouterContext
    return RouterContext(k=layer.top_k, num_experts=layer.num_experts, score_function=layer.score_function,
                         layer=layer)


def test_ties_are_counted_and_explained():
    layer = LayerInfo("t", num_experts=4, top_k=1, score_function="softmax", score_dtype="float32")
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    r = reroute(z, "native", layer=layer)
    assert r.params["tied_tokens"] == 1
    other = 3 - int(r.mask[0].nonzero()[0, 0])  # the model took the other of the tied experts 1 and 2
    part = NativeAgreementPartial.empty(4)
    part.update(z, torch.tensor([[other], [0]]), layer)
    assert (part.result().agreeing_tokens, part.result().tied_tokens) == (1, 1)
    # a disagreement without a tie is not explained
    part = NativeAgreementPartial.empty(4)
    part.update(z, torch.tensor([[0], [1]]), layer)
    res = part.result()
    assert (res.tokens, res.agreeing_tokens, res.tied_tokens, res.rate) == (2, 0, 0, 0.0)
    assert res.to_dict() == {"tokens": 2, "agreeing_tokens": 0, "tied_tokens": 0, "rate": 0.0}
    merged = part.merge(NativeAgreementPartial.empty(4))
    assert merged.result() == res
    # group ties: two groups score the same, either may be kept
    glayer = _hand_layer(topk_group=1, n_group=2)
    zt = torch.logit(torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.9, 0.1, 0.5, 0.5]], dtype=torch.float64))
    rt = reroute(zt, "native", layer=glayer)
    assert rt.params["tied_tokens"] == 1
    flipped = torch.roll(rt.mask, 4, dims=1)
    assert tie_consistent(zt, flipped, glayer, 2).tolist() == [True]
    assert tie_consistent(zt, torch.roll(rt.mask, 1, dims=1), glayer, 2).tolist() == [False]


def test_switch_capacity_drops_in_position_order(tmp_path):
    """Expert capacity 2 per row: later tokens of a row beyond it get no expert, as the model drops them."""
    model = _model("switch_transformers", expert_capacity=2)
    batch = padded_batch("switch_transformers")
    for key in ("input_ids", "attention_mask"):  # right padding in row 1
        batch[key][1] = batch[key][1].roll(-3)
    with capture(model, tmp_path / "log", fsync=False), torch.no_grad():  # no padding before a real token
        model(**batch)
    log = RouterLog.open(tmp_path / "log")
    dropped = 0
    for name in log.layers:
        info, chunk = log.layer_info(name), log.read(name, 0, log.num_tokens)
        assert info.expert_capacity == 2
        dropped += int((~chunk.selected.any(-1)).sum())
        part = NativeAgreementPartial.empty(E)
        part.update(chunk.logits, chunk.selected, info, sequence_ids=chunk.sequence_ids)
        assert part.result().agreeing_tokens == log.num_tokens
        rows = chunk.logits.reshape(1, -1, E)[:, :T]  # sequence 0, one row
        r = reroute(rows, "native", layer=info)
        assert torch.equal(r.mask[0], chunk.selected[:T]) and r.params["dropped_assignments"] > 0
    assert dropped > 0


@pytest.mark.parametrize("mt", ["mixtral", "deepseek_v3", "gpt_oss", "phimoe", "dbrx", "llama4_text", "lfm2_moe"])
def test_combine_weights_are_the_models(mt, tmp_path):
    model = _model(mt, **GROUPED.get(mt, {}))
    with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
        model(**padded_batch(mt))
    log = RouterLog.open(tmp_path / "log")
    for name in log.layers:
        info, chunk = log.layer_info(name), log.read(name, 0, log.num_tokens)
        mask = selection_mask(chunk.selected, E)
        applied = chunk.weights if chunk.weights.shape == mask.shape else torch.zeros(mask.shape).scatter_(
            1, chunk.selected.long(), chunk.weights)
        torch.testing.assert_close(combine_weights(chunk.logits, mask, info).float(), applied, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(reroute(chunk.logits, "native", layer=info).weights.float(), applied,
                                   rtol=2e-6, atol=2e-6)


def test_native_needs_the_layer_semantics():
    assert list_routers()[0] == "native"
    z = torch.randn(3, 4)
    with pytest.raises(InvalidParameter, match="native needs the layer's routing semantics"):
        reroute(z, "native", k=1)
    with pytest.raises(InvalidParameter, match="score function is unknown"):
        reroute(z, "native", layer=LayerInfo("l", num_experts=4, top_k=1))
    with pytest.raises(InvalidParameter, match="group_score is unknown"):
        reroute(torch.randn(3, 8), "native", layer=LayerInfo("l", num_experts=8, top_k=2, score_function="sigmoid",
                                                             n_group=4, topk_group=2))
    with pytest.raises(InvalidParameter, match="model's k = 1"):
        reroute(z, "native", k=2, layer=LayerInfo("l", num_experts=4, top_k=1, score_function="softmax"))


def test_manifest_roundtrip_and_older_manifests_read_with_defaults(tmp_path):
    layer = _hand_layer(selection_bias=[0.1] * 8, expert_capacity=3, num_shared_experts=2, weight_function="sigmoid",
                        selection_score="sigmoid", norm_topk_p=2.0)
    with RouterLogWriter(tmp_path / "log", [layer, LayerInfo("plain", num_experts=8)], fsync=False) as w:
        w.append({"hand": torch.randn(4, 8), "plain": torch.randn(4, 8)}, torch.arange(4),
                 torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert RouterLog.open(tmp_path / "log").layer_info("hand") == layer
    path = tmp_path / "log" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    old_keys = {"name", "num_experts", "top_k", "module_path", "score_function", "selection_bias"}
    for entry in manifest["layers"]:
        for key in set(entry) - old_keys:
            del entry[key]
    path.write_text(json.dumps(manifest))
    old = RouterLog.open(tmp_path / "log", verify="full").layer_info("hand")
    assert old == LayerInfo("hand", num_experts=8, top_k=2, score_function="sigmoid", selection_bias=(0.1,) * 8)
    assert (old.n_group, old.topk_group, old.group_score, old.expert_capacity, old.score_dtype) == (1, None, None,
                                                                                                   None, None)
    assert (old.norm_topk_prob, old.routed_scaling_factor, old.num_shared_experts) == (None, 1.0, 0)
    assert (old.selection, old.weights, old.group_limited) == ("sigmoid", "sigmoid", False)
    for bad in ({"n_group": 3}, {"topk_group": 5}, {"group_score": "sum"}, {"score_dtype": "int8"},
                {"expert_capacity": -1}, {"norm_topk_p": 0.0}, {"routed_scaling_factor": float("nan")},
                {"weight_function": "relu"}, {"norm_topk_prob": 1}, {"num_shared_experts": 1.5}):
        with pytest.raises(Exception, match="layer 'hand'"):
            _hand_layer(**bad)
