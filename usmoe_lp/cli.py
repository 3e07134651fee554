"""The ``usmoe-lp`` command line: parses arguments and calls the API, nothing more."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from usmoe_lp.certify_cli import certify_command
from usmoe_lp.cli_errors import fail
from usmoe_lp.compare_cli import compare_command
from usmoe_lp.diagnostics.cli import analyze_command
from usmoe_lp.errors import InvalidParameter, UsmoeLpError
from usmoe_lp.export_cli import export_command
from usmoe_lp.live.cli import evaluate_command
from usmoe_lp.logs.cli import capture_command, import_command, log_app
from usmoe_lp.tiny.cli import train_tiny_command
from usmoe_lp.verify.claims import DEFAULT_BACKENDS

# rich_markup_mode=None: click's plain help, where flags show no "<bool>" value they would refuse.
# Errors: every command prints them through usmoe_lp.cli_errors.fail (one line, API keywords as flags).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Routing analysis and theory verification for sparse Mixture-of-Experts.")


def _print_version(value: bool) -> None:
    if value:
        from usmoe_lp import __version__

        typer.echo(f"usmoe-lp {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the usmoe-lp version and exit")) -> None:
    """Routing analysis and theory verification for sparse Mixture-of-Experts."""


log_app.command("export")(export_command)
app.add_typer(log_app, name="log")
app.command("import")(import_command)
app.command("capture")(capture_command)
app.command("analyze")(analyze_command)
app.command("compare")(compare_command)
app.command("evaluate")(evaluate_command)
app.command("certify")(certify_command)
app.command("train-tiny")(train_tiny_command)
console = Console()
err = Console(stderr=True)


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        try:
            T, N = part.lower().strip().split("x")
            out.append((int(T), int(N)))
        except ValueError:
            raise typer.BadParameter(f"size {part!r} is not of the form TxN, e.g. 64x8") from None
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in _names(text))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def _print_summary(result, out: Path, seconds: float) -> None:
    table = Table(title=f"usmoe-lp verify: {len(result.records)} checks in {seconds:.1f} s")
    for col in ("claim", "verdict", "failures / trials", "worst gap", "minimal counterexample"):
        table.add_column(col)
    for c in result.claim_summary():
        cx = c["minimal_counterexample"]
        verdict = "[green]holds[/]" if c["verdict"] == "holds" else f"[red]{c['verdict']}[/]"
        table.add_row(c["claim"], verdict, f"{c['failures']} / {c['trials']}",
                      f"{c['worst_gap']:.3g}", "" if cx is None else f"{cx['size']} k={cx['k']}: {cx['scores']}")
    console.print(table)
    console.print(f"report: {out / 'report.md'} (json: {out / 'report.json'})")


def _run_verify(config, out: Path, overwrite: bool, progress: bool, workers: int | None = None,
                scheduler: str | None = None):
    from usmoe_lp.cluster import check_cluster, dask_client
    from usmoe_lp.report.verify_report import check_verify_destination, write_verify_report
    from usmoe_lp.verify import run_verify

    flags = {"workers": "--workers", "scheduler": "--scheduler"}
    check_cluster(workers, scheduler, names=flags)
    check_verify_destination(out, overwrite=overwrite, overwrite_flag="--overwrite", out_flag="--out")
    t0 = time.perf_counter()
    with dask_client(workers=workers, scheduler=scheduler, names=flags) as client:
        result = run_verify(config, progress=progress, client=client)
    seconds = time.perf_counter() - t0
    # the report records the command line of the config (no --out): same inputs, same bytes anywhere
    write_verify_report(result, out, overwrite=overwrite, overwrite_flag="--overwrite")
    return result, seconds


def _not_run(result) -> list[str]:
    return [c["claim"] for c in result.claim_summary() if c["verdict"] == "not run"]


@app.command()
def verify(
    families: str = typer.Option("all", "--families", "--matrix-families",
                                 help="matrix families (random score-matrix generators), comma-separated "
                                      "(see `usmoe-lp families`)"),
    sizes: str = typer.Option("8x4,16x8,64x8", help="T x N sizes, comma-separated"),
    ks: str = typer.Option("1,2", help="experts per token of the matched TC (budget c = T*k)"),
    trials: int = typer.Option(10, help="instances per matrix family x size x k"),
    seed: int = typer.Option(0, help="master seed (same seed, same report)"),
    backends: str = typer.Option(
        ",".join(DEFAULT_BACKENDS),
        help="optimum backends, at least two independent ones: closed_form (threshold rule), highs (LP relaxation, "
             "one HiGHS model per batch), milp (0/1 program, HiGHS MIP in-process), exhaustive (every 0/1 mask, "
             "T*N <= 20), cbc (0/1 program by CBC: a subprocess per instance, slow), flow (min-cost flow)"),
    claims: str = typer.Option("all", help="claim ids, comma-separated (see `usmoe-lp claims`)"),
    ilp_max_vars: int = typer.Option(4096, help="run the 0/1 backends (milp, exhaustive, cbc) only up to this T*N"),
    shrink: bool = typer.Option(True, help="shrink failures to minimal counterexamples"),
    shrink_all: bool = typer.Option(False, help="shrink every failing instance, not only the first per "
                                    "claim x family x size (slower)"),
    out: Path = typer.Option(Path("verify-report"), help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier verify report at --out "
                                   "(never other files)"),
    strict: bool = typer.Option(False, help="exit 1 when any claim fails"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    workers: int | None = typer.Option(None, "--workers", help="check the batches of instances on a local Dask "
                                       "cluster of N worker processes (default: this process); the report is the "
                                       "same bytes whatever N"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="check them on a running dask.distributed "
                                         "cluster at ADDRESS (e.g. tcp://10.0.0.5:8786)"),
) -> None:
    """Check the USMoE paper's LP claims on random score matrices; write report.json/.md and figures.

    Instances of one matrix family x size x k are generated, routed, solved and certified in batches;
    with --workers or --scheduler the batches run on a Dask cluster, then the first failure of each
    claim x family x size is shrunk, in the same order either way.

    A failing claim is a finding, not an error: the exit code is 0 unless --strict. A claim that
    ran on no instance exits 1. The report is built aside and replaces --out only when complete.
    """
    from usmoe_lp.verify import VerifyConfig

    try:
        config = VerifyConfig(
            families=tuple(_names(families)) if families != "all" else VerifyConfig.families,
            sizes=_sizes(sizes), ks=_ints(ks), trials=trials, seed=seed,
            backends=_names(backends), claims=_names(claims) if claims != "all" else VerifyConfig.claims,
            ilp_max_vars=ilp_max_vars, shrink=shrink, shrink_all=shrink_all)
        result, seconds = _run_verify(config, out, overwrite, progress, workers, scheduler)
    except UsmoeLpError as exc:
        raise fail(exc, aliases={"ilp_max_vars": "--ilp-max-vars"}) from None
    _print_summary(result, out, seconds)
    idle = _not_run(result)
    if idle:  # the config checks make this unreachable; never report a silent "not run" as success
        err.print(f"[red]error:[/] claims {', '.join(idle)} ran on no instance of --sizes/--ks/--backends")
        raise typer.Exit(1)
    if strict and any(c["verdict"] == "fails" for c in result.claim_summary()):
        raise typer.Exit(1)


@app.command()
def demo(out: Path = typer.Option(Path("out/demo"), help="output directory"),
         tokens: int = typer.Option(8192, help="held-out tokens to capture and analyse (the live evaluation "
                                    "scores the first tokens/16 bytes, at most 509, of each held-out document)"),
         overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite",
                                        help="replace an earlier demo output at --out (never other files); "
                                        "--no-overwrite refuses any non-empty --out")) -> None:
    """The main job on the embedded default (no download, no GPU): verify the LP claims, capture the
    embedded trained MoE's router logits on held-out text, analyse them, write one report.

    The demo is built aside and replaces --out only when complete. It replaces its own earlier
    output (so `make demo` can run again) but refuses a --out holding anything else."""
    from usmoe_lp.demo import run_demo

    t0 = time.perf_counter()
    try:
        if tokens < 1:
            raise InvalidParameter(f"--tokens must be >= 1, got {tokens}")
        result = run_demo(out, max_tokens=tokens, overwrite=overwrite, overwrite_flag="--overwrite",
                          out_flag="--out")
    except UsmoeLpError as exc:
        raise fail(exc, aliases={"max_tokens": "--tokens"}) from None
    _print_summary(result.verify, out / "verify", result.seconds["verify"])
    sec = result.seconds
    console.print(f"\n[bold]usmoe-lp demo[/] in {time.perf_counter() - t0:.0f} s (verify {sec['verify']:.0f} s, "
                  f"capture {sec['capture']:.0f} s, analyze {sec['analyze']:.0f} s, evaluate {sec['evaluate']:.0f} s) "
                  f"— report: {result.report}")
    for i, line in enumerate(result.summary, start=1):
        console.print(f"{i}. {line}")


@app.command("families")
def list_families() -> None:
    """List the matrix families: generators of the random score matrices verify checks the claims on."""
    from usmoe_lp.verify import FAMILIES

    for f in FAMILIES.values():
        console.print(f"{f.name:10s} {'signed  ' if f.signed else 'positive'}  {f.description}")


@app.command("claims")
def list_claims() -> None:
    """List the claims that verify checks."""
    from usmoe_lp.verify import CLAIMS

    for c in CLAIMS.values():
        console.print(f"[bold]{c.id}[/]: {c.statement}\n    source: {c.source}; theory: {c.expectation}")


def main() -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files; never open windows from the CLI
    app()


if __name__ == "__main__":
    main()
