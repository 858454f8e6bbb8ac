"""Results commands: ``privseg table``, ``privseg plot``, ``privseg reproduce``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from privseg.cli_common import console, fail
from privseg.errors import ConfigError

if TYPE_CHECKING:  # pandas costs ~0.8 s to import: only the commands that read runs do
    import pandas as pd

app = typer.Typer()


def load_target(target: str, output: str | None = None) -> tuple[pd.DataFrame, str]:
    """A results directory, ``wandb:ENTITY/PROJECT``, or a sweep (file or built-in name):
    for a sweep, exactly its runs from its output directory."""
    from privseg.results.store import load
    from privseg.sweeps.spec import SweepError, expand, load_sweep

    if target.startswith("wandb:") or Path(target).is_dir():
        return load(target), Path(target).name
    try:
        sw = load_sweep(target, {"output.dir": output} if output else None)
    except SweepError as e:
        raise FileNotFoundError(f"{target}: not a results directory, and {e}") from None
    runs = [r for r in expand(sw) if r.config is not None]
    if not runs:
        raise FileNotFoundError(f"{target}: no valid run in the sweep")
    out_dir = Path(runs[0].config.output.dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no results yet; run `privseg sweep {target}`")
    return load(out_dir, run_ids=[r.run_id for r in runs]), sw.name


def _load_runs(target: str, output: str | None):
    """The complete runs behind ``target`` and its name; exits with a message when none."""
    try:
        df, name = load_target(target, output)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        fail(str(e))
    if df.empty:
        fail(f"{target}: no complete runs found", code=1)
    return df, name


@app.command()
def table(
    target: Annotated[str, typer.Argument(help="A sweep (file or built-in name), a results "
                                               "directory, or wandb:ENTITY/PROJECT")],
    format: Annotated[str, typer.Option("--format", "-f", help="markdown, latex or csv")
                      ] = "markdown",
    per_class: Annotated[bool, typer.Option("--per-class", help="One column per class")
                         ] = False,
    metric: Annotated[str, typer.Option(help="Column to tabulate, e.g. test.mean_hd95, "
                                     "or released.mean_dice (the EMA weights when kept)")
                      ] = "test.mean_dice",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Sweep output dir "
                                               "(when TARGET is a sweep)")] = None,
) -> None:
    """Mean ± std over seeds per architecture × ε (non-private first) of the test Dice.

    A cell pools only runs equal in all but the seed; runs differing otherwise are separate
    rows (a variant column names the keys). A one-seed cell has no ±.

    Example:  privseg table arch-eps-phantom2d --format latex
    """
    from privseg.results.tables import caption, render

    if format not in ("markdown", "latex", "csv"):
        fail("--format must be markdown, latex or csv")
    df, name = _load_runs(target, output)
    if metric not in df:
        fail(f"--metric {metric}: not a column; e.g. test.mean_dice, test.mean_hd95")
    typer.echo(render(df, format, per_class, metric, caption=caption(df, name, metric)))


@app.command()
def plot(
    target: Annotated[str, typer.Argument(help="A sweep (file or built-in name), a results "
                                               "directory, or wandb:ENTITY/PROJECT")],
    out: Annotated[str | None, typer.Option("--out", help="Folder for the PNG and PDF files "
                                            "(default: OUTPUT_DIR/figures)")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Sweep output dir "
                                               "(when TARGET is a sweep)")] = None,
) -> None:
    """Figures: Dice vs ε, Dice vs width, central vs federated, per site (as data allows).

    Example:  privseg plot runs/arch-eps-phantom2d --out figures
    """
    from privseg.results.figures import make_figures

    df, name = _load_runs(target, output)
    folder = Path(out) if out else (Path(target) if Path(target).is_dir() else Path(
        df["config.output.dir"].iloc[0])) / "figures"
    paths = make_figures(df, folder, prefix=f"{name}_")
    if not paths:
        fail("the data supports no figure (need ≥2 ε, widths, settings or sites)", code=1)
    for p in paths:
        typer.echo(str(p))


@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help="Table name (see results/reference/index.json), "
                                             "e.g. table1")],
    quick: Annotated[bool, typer.Option("--quick", help="The quick variant (built-in phantom, "
                                                        "CPU) instead of the full one")] = False,
    parallel: Annotated[int, typer.Option("--parallel", "-j", min=1, help=(
        "Runs trained at once (worker processes, one CPU thread each; spread over visible "
        "GPUs). Results do not depend on it"))] = 1,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output directory")
                      ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key in every run (e.g. dataset.root=...)")
                    ] = None,
    write_reference: Annotated[bool, typer.Option(
        "--write-reference", help="Maintainers: store the new numbers as the committed "
                                  "reference")] = False,
) -> None:
    """Rerun the sweep behind a paper table; print the committed numbers beside the new ones.

    Example:  privseg reproduce table1 --quick -j 2
    """
    from privseg.results.reference import (
        agreement_text,
        compare,
        read_reference,
        reference_dir,
        table_entry,
    )
    from privseg.results.reference import write_reference as write_ref
    from privseg.results.store import load
    from privseg.results.tables import to_markdown
    from privseg.sweeps.cli import _load, _run_reported

    try:
        entry = table_entry(name, quick)
    except KeyError as e:
        fail(str(e.args[0]))
    out_dir = output or f"runs/reproduce-{name}-{entry['variant']}"
    sw = _load(entry["sweep"], set_, out_dir)
    console.print(f"[bold]{entry['title']}[/] ({entry['variant']}): sweep {sw.name}",
                  highlight=False)
    again = "privseg " + " ".join(shlex.quote(a) for a in sys.argv[1:]
                                  if a != "--write-reference")
    result = _run_reported(sw, parallel, f"rerun `{again}`")
    ids = [o.run_id for o in result.outcomes if o.run_id and o.status != "failed"]
    new = load(result.output_dir, run_ids=ids)
    if entry.get("report") == "audit":
        _audit_report(new, result.output_dir / "figures")
        if not result.ok:
            raise typer.Exit(1)
        return
    ref_name = entry.get("reference")
    ref_path = reference_dir() / ref_name if ref_name else None
    agrees = True  # nothing to compare against: the new numbers are printed
    if write_reference:
        if ref_path is None:
            fail(f"{name} {entry['variant']}: index.json names no reference file")
        cmd = "privseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_ref(new, ref_path, command=cmd, sweep_file=sw.path)
        typer.echo(f"wrote {ref_path}")
    if ref_path is None or not ref_path.exists():
        typer.echo(f"no committed reference numbers for {name} ({entry['variant']}); new:")
        from privseg.results.tables import render

        typer.echo(render(new, "markdown"))
    else:
        ref, meta = read_reference(ref_path)
        typer.echo(f"\nreference: {ref_path.name}")
        for k in ("command", "date", "machine", "sweep"):
            if k in meta:
                typer.echo(f"  {k}: {meta[k]}")
        typer.echo("\nTest Dice (mean over classes), mean ± std (ddof 1) over seeds:\n")
        typer.echo(to_markdown(compare(ref, new)))
        text, agrees = agreement_text(ref, new, meta)
        typer.echo("\n" + text)
        if not agrees:
            typer.echo("the rerun does NOT agree with the reference (see above)")
    if entry.get("report") == "sharing":
        _sharing_report(new, result.output_dir / "figures", entry.get("published"))
    if not result.ok or not agrees:
        raise typer.Exit(1)


def _sharing_report(df: pd.DataFrame, folder: Path, published: dict | None = None) -> None:
    """Dice per fraction shared × ε (SVT, no DP, DP-FedAvg beside), bytes per round against
    full sharing, the published numbers (index.json ``published``) beside, and the figure
    (``privseg reproduce li2019``)."""
    from privseg.results.sharing import (
        bytes_table,
        dice_vs_fraction,
        published_table,
        sharing_table,
    )
    from privseg.results.tables import to_markdown

    typer.echo("\nTest Dice per fraction of each update shared × ε (ε per site):\n")
    typer.echo(to_markdown(sharing_table(df)))
    typer.echo("\nBytes each site sends per round (parameter payload) vs full sharing:\n")
    typer.echo(to_markdown(bytes_table(df)))
    if published:
        typer.echo(f"\nPublished: {published.get('source', '?')} ({published.get('metric', '')})"
                   ":\n")
        typer.echo(to_markdown(published_table(df, published)))
    _save_figure(dice_vs_fraction(df), folder, "li2019_dice_vs_fraction")


def _save_figure(fig, folder: Path, name: str) -> None:
    """Save a report's figure as PNG and PDF under ``folder`` and name it (None: nothing)."""
    if fig is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"{name}.{ext}", dpi=150)
    typer.echo(f"figure: {folder / name}.png")


def _audit_report(df: pd.DataFrame, folder: Path) -> None:
    """Claimed vs audited ε per audit, the invariant's verdict, and the figure (``privseg
    reproduce audit``); exits 1 when a correct run's bound exceeds its claim or a broken
    run's does not."""
    from privseg.results.audit_figure import claimed_vs_audited
    from privseg.results.audit_report import audit_table, audit_verdict
    from privseg.results.tables import to_markdown

    typer.echo("\nClaimed ε (accountant) vs audited lower bound (95%), one training run each:\n")
    typer.echo(to_markdown(audit_table(df)))
    text, ok = audit_verdict(df)
    typer.echo("\n" + text)
    _save_figure(claimed_vs_audited(df), folder, "audit_claimed_vs_audited")
    if not ok:
        typer.echo("the audit does NOT behave as a correct mechanism must (see above)")
        raise typer.Exit(1)
