"""Exceptions raised by usmoe-lp.

Every error the library raises on bad input is a :class:`UsmoeLpError`; the subclass names the
kind of problem and the message says what was wrong and what to do about it.
"""

from __future__ import annotations


class UsmoeLpError(Exception):
    """Base class of every error raised by usmoe-lp on bad input or a failed computation."""


class InvalidScores(UsmoeLpError, ValueError):
    """Scores are empty, of the wrong rank, or contain NaN/Inf."""


class InvalidParameter(UsmoeLpError, ValueError):
    """A routing or program parameter is out of range (k <= 0, k > N, budget > T*N, ...)."""


class ShapeMismatch(UsmoeLpError, ValueError):
    """Two arrays that must agree in shape do not (a mask and its scores, bounds and scores)."""


class InfeasibleProblem(UsmoeLpError, ValueError):
    """The constraints of a routing program admit no 0/1 routing; the message names them."""


class UnsupportedProblem(UsmoeLpError, ValueError):
    """The chosen backend cannot solve this program (e.g. the closed form on combined caps)."""


class SolverError(UsmoeLpError, RuntimeError):
    """A solver backend failed or is not installed."""


class OutputExists(UsmoeLpError, FileExistsError):
    """An output path cannot take a new result: it is a file, not empty, or holds files of the user's."""


class AllPaddingWarning(UserWarning):
    """A router was given a padding mask that marks every token as padding, so it routed nothing.

    Legitimate in a stream of batches (and in diagnostics that route padded groups one by one),
    but never silent; filter it with ``warnings.simplefilter("ignore", AllPaddingWarning)``."""
