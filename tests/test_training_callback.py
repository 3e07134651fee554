"""``RoutingStatsCallback`` in a real ``transformers.Trainer`` run of a tiny random-weight MoE (a few steps).

Oracle: the test's own forward hooks on the models' gate modules record every training forward's router
logits and attention mask; the statistics are recomputed from them with plain torch (softmax, topk,
bincount) and the pooled aux loss with transformers' own ``load_balancing_loss_func``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_capture_families import tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments  # the Trainer needs accelerate
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.training import RoutingStatsCallback

SEQ, PAD, V = 10, 3, 1000


class Batches(torch.utils.data.Dataset):
    """Random token sequences; every odd one has PAD left-padding tokens (masked, labels -100)."""

    def __init__(self, n: int = 16) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(3, V, (SEQ,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(SEQ, dtype=torch.long)
        if i % 2:
            ids[:PAD] = 0
            mask[:PAD] = 0
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Reporter(TrainerCallback):
    """Stands for TensorBoard / W&B: records every on_log call; added BEFORE the routing callback."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class Oracle:
    """The test's own capture: gate outputs of training forwards of the top model, with the step and mask."""

    def __init__(self, model, trainer_state) -> None:
        self.records: list[tuple[int, list[torch.Tensor], torch.Tensor]] = []
        self.inside = False
        self.state = trainer_state
        model.register_forward_pre_hook(self.begin, with_kwargs=True)
        model.register_forward_hook(self.end)
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(self.gate)

    def begin(self, module, args, kwargs):
        if module.training:
            self.inside = True
            self.records.append((self.state().global_step, [], kwargs["attention_mask"].clone()))

    def gate(self, module, args, output):
        if self.inside:
            self.records[-1][1].append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def end(self, module, args, output):
        self.inside = False

    def window(self, steps: range):
        """(per-layer (rows, N) logits of the forwards of ``steps`` (global_step values), (rows,) mask)."""
        recs = [r for r in self.records if r[0] in steps]
        layers = [torch.cat([r[1][i] for r in recs]) for i in range(len(recs[0][1]))]
        return layers, torch.cat([r[2].reshape(-1) for r in recs])


def expected(layers, mask, k: int) -> dict[str, float]:
    """The callback's keys for one window, recomputed by hand."""
    keep = mask.bool()
    n = layers[0].shape[1]
    out = {}
    for i, z in enumerate(layers):
        z = z[keep].float()
        p = torch.softmax(z, -1)
        counts = torch.bincount(torch.topk(p, k).indices.reshape(-1), minlength=n).double()
        share = counts / counts.sum()
        pd = torch.softmax(z.double(), -1)
        name = f"routing/layer{i}"
        for e in range(n):
            out[f"{name}/load_share/{e}"] = share[e].item()
        out[f"{name}/load_entropy"] = (-(share[share > 0] * share[share > 0].log()).sum() / math.log(n)).item()
        out[f"{name}/token_entropy"] = (-(pd * pd.log()).sum(-1)).mean().item()
        out[f"{name}/maxvio"] = (counts.max() / counts.mean() - 1).item()
        out[f"{name}/aux_loss"] = (n * ((counts / keep.sum()) * pd.mean(0)).sum()).item()
        out[f"{name}/tokens"] = int(keep.sum())
    # transformers' own definitions: pooled over layers, and (OLMoE scripts) the mean of per-layer losses
    out["routing/aux_loss_pooled"] = load_balancing_loss_func(tuple(layers), n, k, mask).item()
    out["routing/aux_loss_layer_mean"] = sum(load_balancing_loss_func((z,), n, k, mask).item()
                                             for z in layers) / len(layers)
    return out


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=4, logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                seed=0, learning_rate=1e-3)
    base.update(kw)
    return TrainingArguments(**base)


def _losses(history) -> list[float]:
    return [e["loss"] for e in history if "loss" in e]


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_logged_statistics_equal_the_hand_computed_ones(family, tmp_path):
    model = tiny_model(family).train()
    reporter = Reporter()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Batches(), callbacks=[reporter])
    callback = RoutingStatsCallback(trainer)
    trainer.add_callback(callback)
    oracle = Oracle(model, lambda: trainer.state)
    trainer.train()

    history = trainer.state.log_history
    logged = [e for e in history if "routing/aux_loss_pooled" in e]
    assert [e["step"] for e in logged] == [2, 4] and callback.logged == 2
    assert len(_losses(history)) == 2  # the Trainer still logs its own loss at those steps
    k = model.config.num_experts_per_tok
    for entry, steps in zip(logged, (range(0, 2), range(2, 4)), strict=True):
        want = expected(*oracle.window(steps), k)
        for key, value in want.items():
            if key.endswith("/tokens") or "/load_share/" in key:
                assert entry[key] == value, key
            else:
                assert entry[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        # 2 micro-batches x 2 sequences of SEQ tokens per step, 2 steps, half the sequences padded
        assert entry["routing/layer0/tokens"] == 2 * 2 * 2 * SEQ - 2 * 2 * PAD
        assert set(entry) == set(want) | {"epoch", "step"}
    reported = [e for e in reporter.logs if "routing/aux_loss_pooled" in e]
    assert len(reported) == 2 and all(isinstance(v, float | int) for e in reported for v in e.values())
    assert reported[0]["routing/aux_loss_pooled"] == logged[0]["routing/aux_loss_pooled"]
    assert not callback._handles  # hooks removed at the end of training


def test_training_is_unchanged_and_eval_and_recomputation_are_not_counted(tmp_path):
    def run(with_callback: bool, n: int = 16, **kw):
        model = tiny_model("olmoe").train()
        trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=Batches(n), eval_dataset=Batches(2))
        if with_callback:
            trainer.add_callback(RoutingStatsCallback(trainer, load_shares=False, prefix="moe"))
        trainer.train()
        return trainer, model

    plain, plain_model = run(False)
    hooked, hooked_model = run(True)
    assert _losses(hooked.state.log_history) == _losses(plain.state.log_history)  # bitwise: gradients unchanged
    for a, b in zip(plain_model.parameters(), hooked_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any("/load_share/" in key for e in hooked.state.log_history for key in e)

    # gradient checkpointing re-runs the routers in the backward pass; evaluation runs them in eval mode;
    # logging once per epoch (4 steps of 2 sequences, no accumulation) counts each training token once
    ckpt, _ = run(True, 8, activation_checkpointing=True, eval_strategy="steps", eval_steps=2,
                  logging_strategy="epoch", gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=1)
    logged = [e for e in ckpt.state.log_history if "moe/aux_loss_pooled" in e]
    assert len(logged) == 1 and logged[0]["step"] == 4
    assert logged[0]["moe/layer1/tokens"] == 8 * SEQ - 4 * PAD
    assert any("eval_loss" in e for e in ckpt.state.log_history)


def test_the_callback_needs_the_trainer():
    with pytest.raises(InvalidParameter, match=r"trainer.add_callback\(RoutingStatsCallback\(trainer\)\)"):
        RoutingStatsCallback(object())
    with pytest.raises(InvalidParameter, match="prefix"):
        RoutingStatsCallback(type("T", (), {"log": lambda self, logs: None})(), prefix="a/")
