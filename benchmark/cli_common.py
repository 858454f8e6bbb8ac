"""What every ``privseg`` command shares: the error console, info logs, a run's summary."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
#: set by the root command's --verbose: dependencies' INFO logs and warnings are shown
VERBOSE = {"on": False}


def fail(message: str, code: int = 2) -> None:
    """Print an error for a person (no traceback) and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def show_info_logs() -> None:
    """Show privseg's own INFO messages (data cache, a run already complete) on stderr.

    ``logging.basicConfig`` cannot: a dependency imported with the engine has already given
    the root logger a handler, which makes ``basicConfig`` do nothing.
    """
    log = logging.getLogger("privseg")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def print_summary(record: dict, out: Path) -> None:
    """A finished run's record in a few lines: where it is, test Dice/HD95, privacy spent."""
    test = record["test"]
    p = record["privacy"]
    console.print(f"[bold]run[/] {record['run_id']}  ->  {out / 'record.json'}")
    console.print(f"test mean Dice {test['mean_dice']:.4f}   mean HD95 {test['mean_hd95']:.2f}")
    per_class = "  ".join(f"{k} {v:.3f}" for k, v in test["dice"].items())
    console.print(f"per class: {per_class}", highlight=False)
    if p["enabled"] and p.get("mode") in ("sample", "site"):  # federated records
        where = "max over sites, " if p["mode"] == "sample" else ""
        secure = ", secure aggregation" if p.get("secure_aggregation") else ""
        console.print(f"privacy: ε = {p['epsilon']:.3f} per {p['unit']} ({where}{p['mode']}-"
                      f"level DP{secure}; see privacy.guarantee in the record)")
    elif p["enabled"]:
        console.print(f"privacy: ε = {p['epsilon']:.3f} at δ = {p['delta']:.3g} per subject "
                      f"(σ = {p['noise_multiplier']:.4f}, q = {p['sample_rate']:.4f}, "
                      f"{p['steps']} steps, {p['accountant']})")
    else:
        console.print("privacy: none (non-private run)")


def quiet_flower() -> None:
    """Flower's console handler at WARNING unless --verbose: its per-round INFO lines flood a
    simulation's terminal. (Flower sets its logger's level when imported, so the root
    command's logger levels cannot reach it; its own ``update_console_handler`` can.)"""
    if VERBOSE["on"]:
        return
    from flwr.common.logger import update_console_handler

    update_console_handler(level="WARNING", timestamps=False, colored=True)
