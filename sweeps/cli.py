"""Sweep commands: ``privseg sweep``, ``sweep-run`` (W&B agent), ``sync``, ``quickstart``."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from privseg.cli_common import console, fail, print_summary
from privseg.errors import ConfigError, SweepError

app = typer.Typer()


def parse_set(items: list[str] | None) -> dict:
    from privseg.sweeps.spec import EPSILON_KEY, is_infinite_epsilon

    out = {}
    for item in items or []:
        if "=" not in item:
            fail(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v if k.strip() == EPSILON_KEY and is_infinite_epsilon(v) else (
            yaml.safe_load(v))
    return out


def _load(file: str, set_: list[str] | None, output: str | None = None):
    from privseg.sweeps.spec import load_sweep

    extra = parse_set(set_)
    if output is not None:
        extra["output.dir"] = output
    try:
        return load_sweep(file, extra)
    except (SweepError, ConfigError) as e:
        fail(str(e))


@app.command()
def sweep(
    file: Annotated[str, typer.Argument(help="Sweep YAML (W&B sweep format) or a built-in "
                                             "sweep name, e.g. quickstart, arch-eps-phantom2d")],
    parallel: Annotated[int, typer.Option("--parallel", "-j", min=1,
                                          help="Runs trained at once (worker processes; "
                                               "spread over visible GPUs)")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and their status; "
                                                            "train nothing")] = False,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output directory "
                                               "(default: the base config's output.dir)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key in every run, e.g. "
                            "--set dataset.root=/data/feta")] = None,
    use_wandb: Annotated[bool, typer.Option("--wandb", help="Create the sweep on the W&B "
                                            "server instead and print the agent command")] = False,
    entity: Annotated[str | None, typer.Option(help="W&B entity (with --wandb)")] = None,
    project: Annotated[str | None, typer.Option(help="W&B project (with --wandb)")] = None,
) -> None:
    """Run every point of a sweep locally: resumable, runs already complete are skipped.

    The same file works with `wandb sweep FILE` + `wandb agent`; see `privseg sweep FILE
    --wandb`. A failed run is reported and the others go on; the exit code is 1 if any failed.

    Example:  privseg sweep arch-eps-phantom2d -j 2   (or --dry-run to list the points)
    """
    from privseg.sweeps.runner import plan

    sw = _load(file, set_, output)
    if use_wandb:
        _create_wandb_sweep(sw, entity, project)
        return
    if dry_run:
        runs, status = plan(sw, None)
        t = Table(title=f"sweep {sw.name}: {len(runs)} runs", title_justify="left")
        for col in ("#", "run id", "run", "status"):
            t.add_column(col)
        for r in runs:
            st = status[r.index]
            text = {"complete": "[green]complete[/]", "pending": "pending"}.get(
                st, f"[red]invalid: {r.error}[/]")
            t.add_row(str(r.index), r.run_id or "-", r.label, text)
        console.print(t)
        counts = {s: sum(v == s for v in status.values()) for s in ("complete", "pending",
                                                                    "invalid")}
        out_dir = next((r.config.output.dir for r in runs if r.config), "?")
        console.print(f"{counts['pending']} to train, {counts['complete']} complete, "
                      f"{counts['invalid']} invalid; output {out_dir}")
        if counts["invalid"]:  # a sweep that cannot run as written is an error, also dry
            raise typer.Exit(1)
        return
    result = _run_reported(sw, parallel, "rerun the same command")
    if not result.ok:
        raise typer.Exit(1)


def _run_reported(sw, parallel: int, resume_hint: str):
    """Run a sweep and report it; Ctrl-C exits 130 telling how to resume."""
    from privseg.sweeps.runner import run_sweep

    warnings.filterwarnings("ignore")
    try:
        result = run_sweep(sw, parallel=parallel, console=console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: {resume_hint} to resume[/]")
        raise typer.Exit(130) from None
    _report(result)
    return result


def _report(result) -> None:
    done, skipped, failed = (result.count(s) for s in ("complete", "skipped", "failed"))
    console.print(f"[bold]{result.sweep}[/]: {done} trained, {skipped} already complete, "
                  f"{failed} failed in {result.wall_s:.0f} s; records under "
                  f"{result.output_dir}", highlight=False)
    for o in result.failed:
        console.print(f"[red]  failed #{o.index} {o.label}: {o.error}[/]", highlight=False)


def _create_wandb_sweep(sw, entity: str | None, project: str | None) -> None:
    import wandb

    from privseg.sweeps.spec import to_wandb

    config = to_wandb(sw)
    sweep_id = wandb.sweep(config, entity=entity, project=project or config.get("project"))
    path = "/".join(p for p in (entity or config.get("entity"), project or config.get(
        "project"), sweep_id) if p)
    typer.echo(f"created W&B sweep {sweep_id} ({sw.name})")
    typer.echo(f"start agents (one per GPU, each on its own):  wandb agent {path}")


@app.command("sweep-run", hidden=True)
def sweep_run(
    params: Annotated[list[str], typer.Argument(help="key=value sweep parameters, as W&B's "
                                                     "${args_no_hyphens} passes them")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train one sweep point (the command a W&B agent runs): base=NAME plus dotted keys."""
    from privseg.run import run
    from privseg.sweeps.spec import build_run_config, parse_agent_args

    try:
        p = parse_agent_args(params)
        group = p.get("tracking.group")
        cfg = build_run_config(p, sweep_name=str(group) if group else None)
    except ConfigError as e:
        fail(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", module="opacus")
    try:
        record = run(cfg, progress=progress)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(f"{cfg.name}: {e}", code=1)
    print_summary(record, Path(cfg.output.dir) / record["run_id"])


def find_offline_runs(root: str | Path, include_synced: bool = False) -> list[Path]:
    """W&B offline run directories (``offline-run-*`` holding a ``.wandb`` file) under root."""
    out = []
    for d in sorted(Path(root).rglob("offline-run-*")):
        if not d.is_dir():
            continue
        files = list(d.glob("*.wandb"))
        if not files:
            continue
        synced = all(Path(f"{f}.synced").exists() for f in files)
        if synced and not include_synced:
            continue
        out.append(d)
    return out


def sync_command(dirs: list[Path], entity: str | None = None,
                 project: str | None = None) -> list[str]:
    exe = shutil.which("wandb")
    cmd = [exe] if exe else [sys.executable, "-m", "wandb"]
    cmd += ["sync"]
    if entity:
        cmd += ["--entity", entity]
    if project:
        cmd += ["--project", project]
    return cmd + [str(d) for d in dirs]


@app.command()
def sync(
    directory: Annotated[str, typer.Argument(help="Output directory of the runs")] = "runs",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded")
                       ] = False,
    include_synced: Annotated[bool, typer.Option(help="Upload again runs already synced")
                              ] = False,
    entity: Annotated[str | None, typer.Option(help="W&B entity override")] = None,
    project: Annotated[str | None, typer.Option(help="W&B project override")] = None,
) -> None:
    """Upload offline W&B runs found under DIRECTORY (wraps `wandb sync`).

    Example:  privseg sync runs/quickstart
    """
    if not Path(directory).is_dir():
        fail(f"{directory}: no such directory")
    dirs = find_offline_runs(directory, include_synced)
    if not dirs:
        typer.echo(f"no offline W&B runs to sync under {directory}")
        return
    cmd = sync_command(dirs, entity, project)
    typer.echo(f"{len(dirs)} offline run(s) under {directory}:")
    for d in dirs:
        typer.echo(f"  {d}")
    if dry_run:
        typer.echo("would run: " + " ".join(cmd))
        return
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def quickstart(
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory")
                      ] = "runs/quickstart",
    parallel: Annotated[int, typer.Option(
        "--parallel", "-j", min=1, help="Runs trained at once (worker processes, one CPU "
                                        "thread each; results do not depend on it)")] = 1,
) -> None:
    """A small sweep on the built-in phantom (2 architectures × ε ∈ {∞, 8, 1}), CPU, minutes.

    Ends with the results table and the path of the utility-vs-privacy figure.

    Example:  privseg quickstart -j 2
    """
    from privseg.results import load, make_figures, render

    t0 = time.perf_counter()
    sw = _load("quickstart", None, output)
    result = _run_reported(sw, parallel, "rerun `privseg quickstart`")
    ids = [o.run_id for o in result.outcomes if o.run_id and o.status != "failed"]
    df = load(result.output_dir, run_ids=ids)
    if df.empty:
        fail("no run finished; see the errors above", code=1)
    typer.echo("\nTest Dice (mean over classes) per architecture and privacy budget ε per "
               "subject:\n")
    typer.echo(render(df, "markdown"))
    figs = make_figures(df, Path(output) / "figures", prefix="quickstart_")
    main = next((p for p in figs if p.name == "quickstart_dice_vs_epsilon.png"), None)
    typer.echo("")
    if main is not None:
        typer.echo(f"figure: {main}")
    others = [p for p in figs if p.suffix == ".png" and p != main]
    for p in others:
        typer.echo(f"also:   {p}")
    typer.echo(f"(total {time.perf_counter() - t0:.0f} s; rerun to reuse the finished runs)")
    if not result.ok:
        raise typer.Exit(1)

