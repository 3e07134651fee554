"""What a live routing did, per layer: realised pairs, k-bar, experts-per-token histogram, dropped tokens, the expert
rows computed (:class:`LayerStats`, :class:`RouteStats`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LayerStats", "RouteStats"]


@dataclass(frozen=True)
class LayerStats:
    """One layer's routing over every forward inside a :func:`usmoe_lp.live.route` context.

    tokens: real (non-padding) tokens routed; decode_tokens: those routed one per step through a KV cache.
    pairs: selected (token, expert) pairs of real tokens; kbar = pairs / tokens (the model's k for its own router).
    histogram: (N + 1,) int64, tokens with 0, 1, ..., N experts. dropped: real tokens with no expert.
    rows_computed: expert rows the experts module computed (padding included where the model's own selection runs
    unchanged, ``native``). native_mismatches: for ``native``, real tokens where the registry's replay of the
    model's router selects other experts than the model did (0 expected; None for other routers).
    """

    layer: str
    num_experts: int
    k: int | None
    tokens: int
    decode_tokens: int
    pairs: int
    histogram: np.ndarray
    rows_computed: int
    native_mismatches: int | None = None

    @property
    def kbar(self) -> float:
        """Realised experts per real token (NaN before any token)."""
        return self.pairs / self.tokens if self.tokens else float("nan")

    @property
    def dropped(self) -> int:
        """Real tokens that got no expert."""
        return int(self.histogram[0])

    def to_dict(self) -> dict:
        return {"layer": self.layer, "num_experts": self.num_experts, "k": self.k, "tokens": self.tokens,
                "decode_tokens": self.decode_tokens, "pairs": self.pairs, "kbar": self.kbar,
                "dropped": self.dropped, "rows_computed": self.rows_computed,
                "experts_per_token": self.histogram.tolist(), "native_mismatches": self.native_mismatches}


@dataclass(frozen=True)
class RouteStats:
    """Every routed layer's :class:`LayerStats`, in model order; ``stats["layer0"]`` by name."""

    layers: tuple[LayerStats, ...]

    def __getitem__(self, name: str) -> LayerStats:
        for s in self.layers:
            if s.layer == name:
                return s
        raise KeyError(f"no routed layer {name!r}; layers: {[s.layer for s in self.layers]}")

    @property
    def tokens(self) -> int:
        """Real tokens routed by the first layer (every layer routes the same tokens)."""
        return self.layers[0].tokens if self.layers else 0

    @property
    def pairs(self) -> int:
        """Selected pairs summed over layers."""
        return sum(s.pairs for s in self.layers)

    @property
    def kbar(self) -> float:
        """Mean over layers of each layer's realised k-bar (pairs per real token)."""
        vals = [s.kbar for s in self.layers if s.tokens]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def rows_computed(self) -> int:
        return sum(s.rows_computed for s in self.layers)

    def to_frame(self):
        """A tidy pandas DataFrame, one row per layer (``LayerStats.to_dict`` without the histogram)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in s.to_dict().items() if k != "experts_per_token"}
                             for s in self.layers])


class _Counter:
    """Running counts of one layer, frozen into :class:`LayerStats` by :meth:`freeze`.

    The counts of real tokens, pairs, the histogram and native's mismatches stay on the device of the router's
    logits and are summed there without a host synchronisation; they are read back when :meth:`freeze` is called
    (``Route.stats``). ``rows_computed`` is a plain int the adapters add to (the expert rows of a dispatch, known on
    the host once its pairs are gathered); rows counted on the device (native) are added at :meth:`freeze`.
    """

    def __init__(self, layer: str, num_experts: int, k: int | None) -> None:
        self.layer = layer
        self.num_experts = num_experts
        self.k = k
        self.rows_computed = 0
        self._native = False
        self._totals: torch.Tensor | None = None  # (5,) int64: tokens, decode tokens, pairs, rows, mismatches
        self._histogram: torch.Tensor | None = None  # (N + 1,) int64

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._totals is None:
            self._totals = torch.zeros(5, dtype=torch.int64, device=device)
            self._histogram = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=device)
        elif self._totals.device != device:  # the model moved between forwards
            self._totals, self._histogram = self._totals.to(device), self._histogram.to(device)
        return self._totals, self._histogram

    def add(self, counts: torch.Tensor, real: torch.Tensor, decode_step: bool) -> None:
        """counts: (n,) int, experts of each token of the forward; real: (n,) bool, False for padding (not
        counted). Same device."""
        totals, histogram = self._on(counts.device)
        c = counts.reshape(-1).long()
        r = real.reshape(-1).to(device=c.device, dtype=torch.int64)
        n_real, pairs = r.sum(), (c * r).sum()
        totals[0] += n_real
        if decode_step:
            totals[1] += n_real
        totals[2] += pairs
        histogram.scatter_add_(0, c.clamp(0, self.num_experts), r)

    def add_native(self, rows: torch.Tensor, mismatches: torch.Tensor | None) -> None:
        """Native: expert rows the model's own selection computed and (if checked) real tokens whose selection
        differs from the registry's replay; 0-d int tensors on the device."""
        totals, _ = self._on(rows.device)
        totals[3] += rows
        if mismatches is not None:
            self._native = True
            totals[4] += mismatches

    def freeze(self) -> LayerStats:
        if self._totals is None:
            tokens = decode = pairs = rows = mismatches = 0
            histogram = np.zeros(self.num_experts + 1, dtype=np.int64)
        else:
            tokens, decode, pairs, rows, mismatches = self._totals.tolist()
            histogram = self._histogram.cpu().numpy().copy()
        return LayerStats(self.layer, self.num_experts, self.k, tokens, decode, pairs, histogram,
                          self.rows_computed + rows, mismatches if self._native else None)
