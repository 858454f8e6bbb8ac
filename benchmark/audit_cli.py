"""``privseg audit``: an empirical lower bound on ε next to the accountant's claim.

A sub-app of the ``privseg`` command tree, assembled in :mod:`privseg.cli`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from privseg.cli_common import console, fail, show_info_logs
from privseg.config import ConfigError, load_config

app = typer.Typer()


@app.command()
def audit(
    config: Annotated[str, typer.Argument(help="YAML run config, or a built-in name "
                                               "(see `privseg configs`)")],
    canaries: Annotated[int | None, typer.Option(
        "--canaries", "-m", help="Number of canaries m (default 1000 gradient, 100 input)")
    ] = None,
    kind: Annotated[str, typer.Option(help="gradient (white-box, in the DP optimizer) or "
                                           "input (canary subjects, black-box)")] = "gradient",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set privacy.target_epsilon=1")
    ] = None,
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound")] = 0.95,
    noise_fraction: Annotated[float, typer.Option(
        help="Deliberate fault: add this fraction of the calibrated noise (the claim is "
             "unchanged); shows that the audit catches a broken mechanism")] = 1.0,
    no_clipping: Annotated[bool, typer.Option(
        "--no-clipping", help="Deliberate fault: sum gradients unclipped")] = False,
    force: Annotated[bool, typer.Option(help="Rerun even if a complete audit record exists")
                     ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train the config once with canaries and print the audited lower bound on ε.

    One-run audit (Steinke, Nasr & Jagielski 2023): m canaries, each in with probability ½.

    The top and bottom 10% of canary scores are guessed in/out; right guesses bound ε below.

    Record: OUTPUT_DIR/RUN_ID-audit-KIND-mM/record.json (privacy.epsilon, audit.epsilon_lower).

    Example:  privseg audit phantom2d -m 1000 --set privacy.target_epsilon=1
    """
    from privseg.audit import Fault, run_audit, summary_line

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        fail(str(e))
    if not 0 < confidence < 1:
        fail("--confidence must be in (0, 1)")
    if noise_fraction < 0:
        fail("--noise-fraction must be >= 0")
    show_info_logs()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    fault = Fault(noise_fraction=noise_fraction, clipping=not no_clipping)
    try:
        record = run_audit(cfg, kind=kind, canaries=canaries, fault=fault,
                           confidence=confidence, progress=progress, force=force)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(f"{cfg.name or config}: {e}", code=1)
    console.print(f"[bold]audit[/] {record['run_id']}  ->  "
                  f"{Path(cfg.output.dir) / record['run_id'] / 'record.json'}", highlight=False)
    typer.echo(summary_line(record))
