"""What a live routing did, per layer: realised pairs, k-bar, experts-per-token histogram, dropped tokens, the expert
rows computed (:class:`LayerStats`, :class:`RouteStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class _Counter:
    """Mutable running counts of one layer (frozen into :class:`LayerStats` by :meth:`freeze`)."""

    layer: str
    num_experts: int
    k: int | None
    tokens: int = 0
    decode_tokens: int = 0
    pairs: int = 0
    rows_computed: int = 0
    native_mismatches: int | None = None
    histogram: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        self.histogram = np.zeros(self.num_experts + 1, dtype=np.int64)

    def add(self, counts: torch.Tensor, decode_step: bool) -> None:
        """counts: (tokens,) experts of each real token."""
        c = counts.detach().to("cpu", torch.int64)
        self.tokens += int(c.numel())
        self.decode_tokens += int(c.numel()) if decode_step else 0
        self.pairs += int(c.sum())
        self.histogram += np.bincount(c.numpy(), minlength=self.num_experts + 1)[: self.num_experts + 1]

    def freeze(self) -> LayerStats:
        return LayerStats(self.layer, self.num_experts, self.k, self.tokens, self.decode_tokens, self.pairs,
                          self.histogram.copy(), self.rows_computed, self.native_mismatches)
