"""``privseg audit``: an empirical lower bound on ε next to the accountant's claim.

A sub-app of the ``privseg`` command tree, assembled in :mod:`privseg.cli`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from privseg.cli_common import console, fail, show_info_logs
from privseg.errors import ConfigError

app = typer.Typer()


@app.command()
def audit(
    config: Annotated[str, typer.Argument(help="YAML run config, or a built-in name "
                                               "(see `privseg configs`)")],
    canaries: Annotated[int | None, typer.Option(
        "--canaries", "-m", help="Number of canaries m (default 1000 gradient, 100 input)")
    ] = None,
    kind: Annotated[str | None, typer.Option(
        help="gradient (white-box: in the DP optimizer; site-level DP: canary site updates) "
             "or input (canary subjects, black-box); default gradient")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set privacy.target_epsilon=1")
    ] = None,
    confidence: Annotated[float | None, typer.Option(
        help="Confidence of the lower bound (default 0.95)")] = None,
    noise_fraction: Annotated[float | None, typer.Option(
        help="Deliberate fault: add this fraction of the calibrated noise (the claim is "
             "unchanged); shows that the audit catches a broken mechanism")] = None,
    no_clipping: Annotated[bool, typer.Option(
        "--no-clipping", help="Deliberate fault: sum gradients unclipped")] = False,
    force: Annotated[bool, typer.Option(help="Rerun even if a complete audit record exists")
                     ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train the config once with canaries and print the audited lower bound on ε.

    One-run audit (Steinke, Nasr & Jagielski 2023): m canaries, each in with probability ½.

    The top and bottom 10% of canary scores are guessed in/out; right guesses bound ε below.

    Central and federated configs: dp_mode sample (canaries in the first site; its ε is the
    claim) and dp_mode site (canary site updates in DP-FedAvg). Options override the config's
    audit section.

    Record: OUTPUT_DIR/RUN_ID-audit-KIND-mM/record.json (privacy.epsilon, audit.epsilon_lower).

    Example:  privseg audit phantom2d -m 1000 --set privacy.target_epsilon=1
    """
    from pydantic import ValidationError

    from privseg.audit import run_audit, summary_line, with_audit
    from privseg.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        fail(str(e))
    try:
        cfg = with_audit(cfg, kind=kind, canaries=canaries, confidence=confidence,
                         noise_fraction=noise_fraction, clipping=False if no_clipping else None)
    except ValidationError as e:
        fail("; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                       for err in e.errors()))
    show_info_logs()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    try:
        record = run_audit(cfg, progress=progress, force=force)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(f"{cfg.name or config}: {e}", code=1)
    console.print(f"[bold]audit[/] {record['run_id']}  ->  "
                  f"{Path(cfg.output.dir) / record['run_id'] / 'record.json'}", highlight=False)
    typer.echo(summary_line(record))
    if record["audit"]["flagged"] and not cfg.audit.broken():
        # not a deliberate fault: the mechanism leaks more than the record reports
        fail(f"{cfg.name or config}: the audited lower bound exceeds the reported ε", code=1)
