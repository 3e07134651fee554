"""``usmoe-lp analyze LOG --out DIR``: parse arguments, call :func:`analyze`, write the report, print a summary.

Routers are the registry's (:func:`usmoe_lp.routers.list_routers`): ``--routers`` names any of them,
and ``--param NAME=V1,V2`` sweeps any router parameter (repeatable), so a router added to the registry
is available here with no edit.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from usmoe_lp.cli_errors import fail
from usmoe_lp.diagnostics.analyze import default_routers
from usmoe_lp.errors import InvalidParameter, UsmoeLpError
from usmoe_lp.logs.errors import LogError
from usmoe_lp.routers import ROUTERS, list_routers

_SHORT_FLAGS = {"alphas": "--alpha", "kbars": "--kbar", "scopes": "--scope", "capacity_factor": "--capacity-factor"}


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(f"--{name} must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_routers(text: str) -> tuple[str, ...]:
    """The router names of a ``--routers`` value (comma-separated; empty: the default sweep's routers);
    :class:`InvalidParameter` naming the flag and listing the registry for an unknown name."""
    names = _names(text)
    if not names:
        return default_routers()
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise InvalidParameter(f"--routers {','.join(unknown)}: unknown router; "
                               f"choose one of {', '.join(list_routers())}")
    return names


def _value(text: str, kind: type, flag: str):
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise InvalidParameter(f"{flag}: {text!r} is not true or false")
    if kind is str:
        return text.strip()
    try:
        return kind(text)
    except ValueError:
        raise InvalidParameter(f"{flag}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def parse_params(items: list[str] | None, routers: tuple[str, ...]) -> dict[str, tuple]:
    """``--param NAME=V1,V2`` items -> the sweep ``{NAME: (V1, V2)}``, values typed by the parameter's
    kind in the first of ``routers`` that has it."""
    sweep: dict[str, tuple] = {}
    for item in items or ():
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise InvalidParameter(f"--param {item!r}: expected NAME=V1,V2 (e.g. --param kbar=1,1.5)")
        owners = [r for r in routers if name in ROUTERS[r].param_names]
        if not owners:
            anyone = [r.name for r in ROUTERS.values() if name in r.param_names]
            where = f"a parameter of {', '.join(anyone)}" if anyone else "a parameter of no registered router"
            raise InvalidParameter(f"--param {name}: no router of --routers ({','.join(routers)}) takes it; "
                                   f"it is {where}")
        if name in sweep:
            raise InvalidParameter(f"--param {name} is given twice; list its values once: --param {name}=V1,V2")
        kind = ROUTERS[owners[0]].param(name).kind
        sweep[name] = tuple(_value(v, kind, f"--param {name}") for v in values.split(",") if v.strip())
    return sweep


def _cli_words(exc: InvalidParameter) -> InvalidParameter:
    """An AnalyzeConfig error in the command's words (``sweep['kbar']`` -> ``--param kbar``)."""
    text = re.sub(r"sweep\['([\w]+)'\]", r"--param \1", str(exc)).replace("in sweep", "in --param")
    for name in ("alphas", "kbars", "scopes"):
        text = re.sub(rf"\b{name}\b", _SHORT_FLAGS[name], text)
    return InvalidParameter(text)


_DOMAINS_JSON = '{"<sequence id>": "label"}'


def read_domains(path: Path, flag: str = "--domains") -> dict[int, str]:
    """The sequence id -> domain label table of a ``--domains`` file: a JSON object ``{"<sequence id>": "label"}``
    or a CSV file with the header ``sequence_id,domain`` (one row per sequence). A file that is neither, a
    sequence id that is not an integer >= 0, an empty label or a sequence labelled twice raises
    :class:`InvalidParameter` naming the flag, the file and the entry."""
    where = f"{flag} {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"{where}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if text.lstrip().startswith("{"):
        try:
            table = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidParameter(f"{where}: not valid JSON ({exc}); expected {_DOMAINS_JSON}") from None
        rows = [(key, value, f"key {key!r}") for key, value in table.items()]
    else:
        lines = text.splitlines()
        reader = csv.reader(lines)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["sequence_id", "domain"] or len(header) != 2:
            first = lines[0] if lines else ""
            raise InvalidParameter(f"{where}: expected a JSON object {_DOMAINS_JSON} or a CSV file whose header is "
                                   f"sequence_id,domain; the first line is {first!r}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise InvalidParameter(f"{where}: line {line} has {len(row)} fields; expected sequence_id,domain")
            rows.append((row[0].strip(), row[1].strip(), f"line {line}"))
    out: dict[int, str] = {}
    for key, label, at in rows:
        if not isinstance(key, str) or not re.fullmatch(r"\d+", key.strip()):
            raise InvalidParameter(f"{where}: {at}: {key!r} is not a sequence id (an integer >= 0)")
        sid = int(key)
        if not isinstance(label, str) or not label.strip():
            raise InvalidParameter(f"{where}: {at}: the domain label of sequence {sid} must be a non-empty string, "
                                   f"got {label!r}")
        if sid in out and out[sid] != label:
            raise InvalidParameter(f"{where}: {at}: sequence {sid} is labelled twice ({out[sid]!r} and {label!r})")
        out[sid] = label
    return out


def analyze_command(
    log: Annotated[str, typer.Argument(help="Router log directory (manifest.json + shards/), a path or a file:// "
                                            "URL. With --workers/--scheduler every worker reads it at this path: "
                                            "on a multi-machine cluster it must be on a shared filesystem.")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (created).")] = Path("analysis"),
    routers: Annotated[str, typer.Option(help=f"Routers to re-route, comma-separated, among "
                                              f"{', '.join(list_routers())} (default: {','.join(default_routers())}).")]
    = "",
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Sweep a router parameter: NAME=V1,V2 (repeatable), e.g. --param kbar=1,1.5 "
                        "--param policy=position,priority; every router that has NAME takes each value.")] = None,
    alpha: Annotated[str, typer.Option(help="USMoE unified-score alphas (default 0.3,0.5,0.7).")] = "",
    kbar: Annotated[str, typer.Option(help="Experts per token on average (fractional allowed); default around k.")]
    = "",
    scope: Annotated[str, typer.Option(help="USMoE scopes: sequence, batch, position.")] = "sequence",
    capacity_factor: Annotated[float | None, typer.Option(help="EC capacity factor: e = ceil(cf T k / N) "
                                                                "(default 1).")] = None,
    layers: Annotated[str, typer.Option(help="Comma-separated layer names (default: all).")] = "",
    top_k: Annotated[int, typer.Option(help="Model top-k where the log does not record it (0 = from the log; "
                                            "an error where the log records another k).")] = 0,
    sequence_tokens: Annotated[int, typer.Option(help="Tokens per layer sampled for re-routing and leakage.")]
    = 16384,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per streamed chunk (bounds memory).")] = 65536,
    no_leakage: Annotated[bool, typer.Option("--no-leakage", help="Skip prefix-consistency leakage.")] = False,
    no_counterfactual: Annotated[bool, typer.Option("--no-counterfactual", help="Skip re-routing.")] = False,
    domains: Annotated[Path | None, typer.Option(
        "--domains", help="Domain label of each sequence, for the routing patterns' domain shares: a JSON object "
                          "{\"<sequence id>\": \"label\"} or a CSV file with header sequence_id,domain. Unlabelled "
                          "sequences are left out of the domain shares (and counted).")] = None,
    no_patterns: Annotated[bool, typer.Option("--no-patterns", help="Skip the routing patterns (co-activation, "
                                              "layer transitions, vocabulary and domain specialisation, expert "
                                              "reuse and LRU hit rates).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier analyze report at --out "
                                            "(never other files).")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Run on a local Dask cluster of N worker processes (default: this process). "
                          "The report is the same bytes whatever N.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Run on a running dask.distributed cluster at ADDRESS (e.g. tcp://10.0.0.5:8786). "
                            "Its workers open LOG by its absolute path: it must be on a filesystem they all "
                            "see (NFS, Lustre, a mounted bucket).")] = None,
) -> None:
    """Analyse a router log: load balance, collapse, margins, leakage, counterfactual re-routing and routing
    patterns.

    A selection log (experts per token, no logits) gives the load and the routing patterns; the report says
    which analyses need logits and were not computed.

    Writes metrics.json, report.md, report.html and PNG figures into --out. The report is built
    aside and replaces --out only when complete; an existing report needs --overwrite.

    The log is cut into token ranges by its shards; with --workers or --scheduler the ranges are
    analysed on a Dask cluster, each worker reading its shards from the log's path (a shared
    filesystem on a multi-machine cluster), and the partial statistics merge in a fixed order.
    """
    from usmoe_lp.cluster import check_cluster, dask_client
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, analyze, check_sweep, log_path, resolve_top_k
    from usmoe_lp.logs.reader import RouterLog
    from usmoe_lp.report.analyze_report import check_analyze_destination, summary_lines, write_analyze_report

    console, err = Console(), Console(stderr=True)
    flags = {"workers": "--workers", "scheduler": "--scheduler"}
    try:
        check_cluster(workers, scheduler, names=flags)
        log = log_path(log)
        names = parse_routers(routers)
        sweep = parse_params(param, names)
        try:
            cfg = AnalyzeConfig(routers=names, sweep=sweep, alphas=_floats(alpha, "alpha") or None,
                                kbars=_floats(kbar, "kbar") or None, scopes=_names(scope) or None,
                                capacity_factor=capacity_factor, chunk_tokens=chunk_tokens,
                                sequence_tokens=sequence_tokens, leakage=not no_leakage,
                                counterfactual=not no_counterfactual, patterns=not no_patterns)
        except InvalidParameter as exc:
            raise _cli_words(exc) from None
        if top_k < 0:
            raise InvalidParameter(f"--top-k must be >= 0 (0: the k the log records), got {top_k}")
        if domains is not None and no_patterns:
            raise InvalidParameter("--domains labels the routing patterns' domain shares; it cannot go with "
                                   "--no-patterns")
        domain_table = None if domains is None else read_domains(domains)
        check_analyze_destination(out, log=log, overwrite=overwrite, overwrite_flag="--overwrite",
                                  out_flag="--out")
        rlog = RouterLog.open(log)
        layer_names = _names(layers) or rlog.layers
        unknown = [n for n in layer_names if n not in rlog.layers]
        if unknown:
            raise InvalidParameter(f"--layers {','.join(unknown)}: not in the log; it has {','.join(rlog.layers)}")
        infos = [rlog.layer_info(n) for n in layer_names]
        resolve_top_k(infos, top_k or None, name="--top-k")
        flags = {p: f"--param {p}" for p in sweep}
        flags.update({p: _SHORT_FLAGS[s] for s, p in (("alphas", "alpha"), ("kbars", "kbar"), ("scopes", "scope"),
                                                      ("capacity_factor", "capacity_factor")) if p not in sweep})
        check_sweep(cfg, infos, names=flags)
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=err, transient=True) as bar, \
                dask_client(workers=workers, scheduler=scheduler, names=flags) as client:
            bars = {"stream": bar.add_task("stream", total=len(layer_names) * rlog.num_tokens,
                                           unit="tokens x layers")}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in bars:  # the per-sequence analyses, one task per layer
                    bars[stage] = bar.add_task("re-route sample", total=total, unit="layers")
                bar.update(bars[stage], completed=done)

            result = analyze(rlog, config=cfg, layers=layer_names, top_k=top_k or None, progress=progress,
                             client=client, domains=domain_table)
        written = write_analyze_report(result, out, overwrite=overwrite, overwrite_flag="--overwrite")
    except (UsmoeLpError, LogError) as exc:
        raise fail(exc) from None
    console.print(f"[bold]usmoe-lp analyze[/]: {escape(str(log))} in {time.perf_counter() - t0:.1f} s")
    for line in summary_lines(result):
        console.print(f"  {escape(line)}")
    console.print(f"report: {escape(str(written['report.html']))} (metrics: {escape(str(written['metrics.json']))})")
