"""What a training run of the tiny model produced (:class:`TrainResult`).

Its own module so that :mod:`usmoe_lp.tiny.train` (which writes the card) and :mod:`usmoe_lp.tiny.card`
(which renders it) both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from usmoe_lp.tiny.evaluate import HeldoutLoss, RoutingStats

__all__ = ["TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`usmoe_lp.tiny.train.train_tiny` did. Losses in nats per token (see
    :class:`usmoe_lp.tiny.evaluate.HeldoutLoss`);
    ``train_loss``: mean language-model cross-entropy (without the auxiliary loss) over the last 10% of steps;
    ``routing`` / ``routing_init``: held-out router statistics of the trained model and of the same weights at
    initialisation; ``seconds``: training wall time (evaluation excluded); ``loss_curve``: (step, train loss)."""

    out: Path
    hyperparameters: dict
    num_parameters: int
    train_tokens: int
    heldout: HeldoutLoss
    heldout_init: HeldoutLoss
    unigram: HeldoutLoss
    train_loss: float
    first_loss: float
    seconds: float
    tokens_per_second: float
    routing: RoutingStats
    routing_init: RoutingStats
    machine: dict
    command: str
    data: dict = field(default_factory=dict)
    loss_curve: tuple[tuple[int, float], ...] = field(default=())

    def to_dict(self) -> dict:
        return {"out": str(self.out), "hyperparameters": dict(self.hyperparameters),
                "num_parameters": self.num_parameters, "train_tokens": self.train_tokens,
                "heldout": self.heldout.to_dict(), "heldout_init": self.heldout_init.to_dict(),
                "unigram": self.unigram.to_dict(), "train_loss": self.train_loss, "first_loss": self.first_loss,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "routing": self.routing.to_dict(), "routing_init": self.routing_init.to_dict(),
                "machine": dict(self.machine), "command": self.command, "data": dict(self.data),
                "loss_curve": [[s, v] for s, v in self.loss_curve]}
