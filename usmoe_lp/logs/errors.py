"""Errors raised by the router log (reading, writing, importing).

All are :class:`usmoe_lp.errors.UsmoeLpError` through :class:`LogError`; every message names the
file (or directory) concerned and says what was wrong and what to do.
"""

from __future__ import annotations

from usmoe_lp.errors import OutputExists, UsmoeLpError


class LogError(UsmoeLpError):
    """Base class of every router-log error."""


class LogNotFound(LogError, FileNotFoundError):
    """The path is not a router log: it does not exist or has no ``manifest.json``."""


class CorruptLog(LogError, ValueError):
    """The log is damaged: truncated or missing shard, checksum mismatch, unparsable manifest,
    tensors whose names, shapes or dtypes disagree with the manifest."""


class MissingLayer(LogError, LookupError):
    """A layer was asked for that the log does not have, or a shard lacks a layer's tensor."""

    def __str__(self) -> str:  # LookupError/KeyError would repr() the message; keep it plain
        return str(self.args[0]) if self.args else ""


class UnsupportedVersion(LogError, ValueError):
    """The manifest was written by a newer format version than this usmoe-lp can read."""


#: How messages spell the option that replaces an existing log. Every message that advises it says
#: exactly this, so an interface that spells it otherwise (the CLI: ``--overwrite``) may substitute
#: its own spelling, or pass ``overwrite_flag=`` to the writer.
OVERWRITE_FLAG = "overwrite=True"


class LogExists(LogError, OutputExists):
    """The writer's target already holds data; pass ``overwrite=True`` to replace a router log (an
    incomplete one from an interrupted run included: there is no resume)."""


class InvalidLogInput(LogError, ValueError):
    """Tensors given to the writer (or an importer) have wrong shapes, dtypes or values."""


class NonFiniteLogits(InvalidLogInput):
    """Router logits contain NaN or Inf (raw logits are finite); the message names the layer."""


class NonFiniteLog(CorruptLog, NonFiniteLogits):
    """A router log holds NaN or Inf logits (its writer refuses them, so the log is damaged); the
    message names the shard file, the layer and the first token. Both a :class:`CorruptLog` and a
    :class:`NonFiniteLogits`."""


class ImportFailed(LogError, ValueError):
    """A foreign dump could not be read or does not have the documented layout."""
