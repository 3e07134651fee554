"""``usmoe-lp certify``: is a user's own 0/1 routing optimal for a routing program?

The command reads a (T, N) score matrix and a (T, N) 0/1 routing mask from files, builds the
program named by ``--program`` (:class:`usmoe_lp.lp.RoutingProblem`: ``tc`` = Token Choice,
``ec`` = Expert Choice, ``budget`` = the USMoE global budget, ``capped`` = budget plus per-token
and per-expert caps; papers/routing-as-lp.md §1-3, arXiv 2503.22996 §3) and prints the exact
optimality certificate of :func:`usmoe_lp.lp.certify` (a :class:`usmoe_lp.lp.Certificate`).

``certify_command`` is mounted on the main app by ``usmoe_lp/cli.py``; this module only parses
arguments, loads the two arrays with the one tensor loader (:func:`usmoe_lp.logs.importers.load_tensor`),
calls the API and prints. Errors go through :func:`usmoe_lp.cli_errors.fail` (one line, exit 2).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from usmoe_lp._json import json_ready
from usmoe_lp.cli_errors import fail
from usmoe_lp.errors import SolverError, UsmoeLpError

__all__ = ["PROGRAMS", "SENSES", "certify_command", "parse_array_spec"]

PROGRAMS = {
    "tc": ("Token Choice: every token takes exactly --k experts", ("k",)),
    "ec": ("Expert Choice: every expert takes exactly --capacity tokens", ("capacity",)),
    "budget": ("global budget: --budget selections in all (--sense <= or ==)", ("budget",)),
    "capped": ("global budget plus at most --token-max experts per token and --expert-max tokens per expert",
               ("budget", "token_max", "expert_max")),
}
"""--program name -> (what it is, the flags it needs, as Python names)."""

SENSES = {"<=": "<=", "le": "<=", "==": "==", "eq": "==", "=": "=="}
"""--sense spellings -> the program's ``budget_sense`` (``le``/``eq`` spare the shell quoting)."""

_FLAG = {"k": "--k", "capacity": "--capacity", "budget": "--budget", "token_max": "--token-max",
         "expert_max": "--expert-max", "sense": "--sense"}
_SENSE_USERS = ("budget", "capped")
_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth", ".bin")
_SEVERAL = re.compile(r"holds (\[.*\]); expected a single tensor")

_HELP = """Certify a routing of your own: is the 0/1 MASK an optimal routing of SCORES for a routing program?

SCORES is a (T, N) array of router scores (T tokens, N experts; any real float dtype) and MASK a
(T, N) array of 0/1 or booleans (1 = token i is routed to expert j), each in a .npy, .npz,
.safetensors or .pt/.pth file (read with torch.load(weights_only=True): tensors only, nothing
unpickled). A file holding several arrays needs the key: FILE.npz:KEY (also .safetensors:KEY, .pt:KEY).

Programs (--program): tc = Token Choice, rows sum to --k; ec = Expert Choice, columns sum to
--capacity; budget = at most (--sense <=) or exactly (--sense ==) --budget selections in all;
capped = the budget plus at most --token-max experts per token and --expert-max tokens per expert.

The certificate is exact (closed-form threshold duals for tc, ec and budget; flow or HiGHS duals
for capped, checked in exact arithmetic): status optimal, not_optimal, infeasible (the mask breaks a
constraint) or undecided, with the primal value, the dual bound, the gap, the margin, the ties and
a one-line verdict. --json prints the certificate as JSON instead.

Exit codes: 0 the certificate was computed (whatever the verdict: read status); 1 the program could
not be certified on good input (the LP relaxation did not solve); 2 bad input (a missing or
inapplicable flag, an unreadable file, NaN scores, a mask of another shape or with values other
than 0/1, an infeasible program).
"""


def parse_array_spec(spec: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:KEY`` -> (path, key or None).

    ``KEY`` is split off only after a known suffix (.npy, .npz, .safetensors, .pt, .pth, .bin), so
    paths with colons elsewhere stay whole.

    >>> parse_array_spec("routing.npz:mask")
    (PosixPath('routing.npz'), 'mask')
    >>> parse_array_spec("scores.npy")
    (PosixPath('scores.npy'), None)
    """
    head, sep, key = spec.rpartition(":")
    if sep and key and head.lower().endswith(_SUFFIXES):
        return Path(head), key
    return Path(spec), None


def _load(spec: str, flag: str):
    """The array of ``--scores`` / ``--mask`` as a torch tensor, or a UsmoeLpError in flag words."""
    from usmoe_lp.logs.errors import ImportFailed
    from usmoe_lp.logs.importers import load_tensor

    path, key = parse_array_spec(spec)
    try:
        return load_tensor(path, key)
    except ImportFailed as exc:
        several = _SEVERAL.search(str(exc))
        if key is None and several:
            raise _CertifyError(f"{flag} {path} holds several arrays {several.group(1)}; pick one as "
                                f"{flag} {path}:KEY") from None
        raise _CertifyError(f"{flag}: {exc}") from None


class _CertifyError(UsmoeLpError):
    """A user error of ``usmoe-lp certify``: printed without a traceback, exit 2."""


def _problem(program: str, scores, values: dict, sense: str | None):
    """The :class:`RoutingProblem` of ``--program`` with its flags; errors name the flags."""
    from usmoe_lp.lp import RoutingProblem

    if program not in PROGRAMS:
        raise _CertifyError(f"--program {program!r} is not a routing program; use one of {', '.join(PROGRAMS)}")
    needs = PROGRAMS[program][1]
    missing = [_FLAG[n] for n in needs if values[n] is None]
    if missing:
        raise _CertifyError(f"--program {program} ({PROGRAMS[program][0]}) needs {' and '.join(missing)}")
    extra = [n for n, v in values.items() if v is not None and n not in needs]
    if extra:
        users = "; ".join(f"{_FLAG[n]} is for --program {' and '.join(p for p, (_, f) in PROGRAMS.items() if n in f)}"
                          for n in extra)
        raise _CertifyError(f"{' and '.join(_FLAG[n] for n in extra)} {'does' if len(extra) == 1 else 'do'} not "
                            f"apply to --program {program} ({users})")
    if sense is not None and program not in _SENSE_USERS:
        raise _CertifyError(f"--sense applies to --program budget and capped, not {program}")
    sense = "<=" if sense is None else sense
    if sense not in SENSES:
        raise _CertifyError(f"--sense {sense!r} is not a budget sense; use <= (or le) or == (or eq)")
    used = " ".join(f"{_FLAG[n]} {values[n]}" for n in needs)
    try:
        if program == "tc":
            return RoutingProblem.token_choice(scores, values["k"])
        if program == "ec":
            return RoutingProblem.expert_choice(scores, values["capacity"])
        if program == "budget":
            return RoutingProblem.budget(scores, values["budget"], sense=SENSES[sense])
        return RoutingProblem.capped(scores, values["budget"], values["token_max"], values["expert_max"],
                                     sense=SENSES[sense])
    except UsmoeLpError as exc:
        where = "--scores" if type(exc).__name__ == "InvalidScores" else f"--program {program} {used}"
        raise _CertifyError(f"{where}: {exc}") from None


def _mask_array(mask):
    """The mask as numpy (bfloat16, which numpy lacks, goes through float32 exactly)."""
    import torch

    if mask.dtype == torch.bfloat16:
        mask = mask.float()
    return mask.numpy()


def _text(cert, problem) -> str:
    def num(x) -> str:
        return "-" if x is None else f"{x:.10g}"

    rows = [
        ("program", problem.describe()),
        ("status", cert.status),
        ("optimal", "yes" if cert.optimal else "no"),
        ("feasible", "yes" if cert.feasible else "no"),
        ("primal", num(cert.primal)),
        ("dual bound", num(cert.dual)),
        ("gap", num(cert.gap)),
        ("margin", num(cert.margin)),
        ("ties", "-" if cert.ties is None else str(cert.ties)),
        ("optimal masks", "-" if cert.log10_optimal_masks is None else f"10^{cert.log10_optimal_masks:.4g}"),
        ("backend", cert.backend),
        ("message", cert.message),
    ]
    return "\n".join(f"{key:>13}: {value}" for key, value in rows)


def certify_command(
    scores: Annotated[str, typer.Option("--scores", metavar="FILE[:KEY]",
                                        help="(T, N) router scores: .npy, .npz, .safetensors or .pt")],
    mask: Annotated[str, typer.Option("--mask", metavar="FILE[:KEY]",
                                      help="(T, N) 0/1 routing to certify (1 = token routed to expert)")],
    program: Annotated[str, typer.Option("--program", metavar="tc|ec|budget|capped",
                                         help="the routing program: tc (Token Choice), ec (Expert Choice), "
                                              "budget (global budget), capped (budget + caps)")],
    k: Annotated[int | None, typer.Option("--k", min=1, help="tc: experts per token")] = None,
    capacity: Annotated[int | None, typer.Option("--capacity", min=1, help="ec: tokens per expert")] = None,
    budget: Annotated[int | None, typer.Option("--budget", min=0, help="budget, capped: total selections")] = None,
    sense: Annotated[str | None, typer.Option("--sense", metavar="<=|==",
                                       help="budget, capped: at most (<=, or le) or exactly (==, or eq) --budget "
                                            "selections; default <=)")] = None,
    token_max: Annotated[int | None, typer.Option("--token-max", min=0,
                                                  help="capped: at most this many experts per token")] = None,
    expert_max: Annotated[int | None, typer.Option("--expert-max", min=0,
                                                   help="capped: at most this many tokens per expert")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the certificate as JSON")] = False,
) -> None:
    from usmoe_lp.lp import certify

    values = {"k": k, "capacity": capacity, "budget": budget, "token_max": token_max, "expert_max": expert_max}
    try:
        if program not in PROGRAMS:  # before reading files: the cheapest mistake first
            _problem(program, None, values, sense)
        score_tensor = _load(scores, "--scores")
        mask_tensor = _load(mask, "--mask")
        problem = _problem(program, score_tensor, values, sense)
        try:
            cert = certify(problem, _mask_array(mask_tensor))
        except SolverError:
            raise
        except UsmoeLpError as exc:  # the mask's shape or values
            raise _CertifyError(f"--mask {mask}: {exc}") from None
    except SolverError as exc:
        raise fail(exc, code=1) from None
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(json_ready(cert.to_dict()), indent=2, sort_keys=True))
    else:
        typer.echo(_text(cert, problem))


certify_command.__doc__ = _HELP
