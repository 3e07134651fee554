"""The mergeable-partial protocol every streaming diagnostic follows.

A *partial* accumulates one statistic over a stream of chunks: ``XPartial.empty(...)`` makes one
with nothing seen, ``update(chunk, ...)`` adds a chunk in place, ``merge(other)`` returns a NEW
partial holding both inputs (neither is modified; associative, so partials of shards or layers
combine in any grouping), and ``result()`` gives the frozen statistics. The analysis driver
(:func:`usmoe_lp.diagnostics.analyze`) streams every layer through such partials and pools layers
by merging them; a Map-Reduce over shards would do the same.

Implemented by :class:`~usmoe_lp.diagnostics.load.LoadPartial`,
:class:`~usmoe_lp.diagnostics.collapse.CollapsePartial`,
:class:`~usmoe_lp.diagnostics.margins.MarginPartial`,
:class:`~usmoe_lp.diagnostics.counterfactual.CounterfactualPartial`,
:class:`~usmoe_lp.diagnostics.leakage.LeakagePartial` and
:class:`~usmoe_lp.diagnostics.native.NativeAgreementPartial` (checked in ``tests/test_registry_consumers.py``);
by the routing-pattern partials :class:`~usmoe_lp.diagnostics.coactivation.CoactivationPartial`,
:class:`~usmoe_lp.diagnostics.transitions.TransitionPartial`, :class:`~usmoe_lp.diagnostics.vocab.VocabPartial`,
:class:`~usmoe_lp.diagnostics.domain.DomainPartial`, :class:`~usmoe_lp.diagnostics.locality.LocalityPartial`
and their container :class:`~usmoe_lp.diagnostics.patterns.PatternStream` (checked in
``tests/test_diag_patterns*.py``); and by :class:`usmoe_lp.compare.AgreementPartial` (routing agreement of two
logs, token by token).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Partial"]

P = TypeVar("P", bound="Partial")


@runtime_checkable
class Partial(Protocol):
    """A mergeable accumulator (module docstring). ``isinstance(x, Partial)`` checks the four methods."""

    @classmethod
    def empty(cls: type[P], *args: Any, **kwargs: Any) -> P:
        """A partial with nothing seen."""
        ...

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one chunk in place."""
        ...

    def merge(self: P, other: P) -> P:
        """A new partial holding both inputs (neither is modified)."""
        ...

    def result(self) -> Any:
        """The frozen statistics of everything seen."""
        ...
