"""The ``privseg`` command line, assembled here from its sub-apps (none imports this module).

| sub-app | commands |
|---|---|
| :mod:`privseg.commands` | ``train``, ``privacy``, ``configs``, ``models``, ``bench``, ``data`` |
| :mod:`privseg.sweeps.cli` | ``sweep``, ``sweep-run``, ``sync``, ``quickstart`` |
| :mod:`privseg.results.cli` | ``table``, ``plot``, ``reproduce`` |
| :mod:`privseg.federated.cli` | ``federated simulate/supernode/run/testbed/link-sweep/...`` |
| :mod:`privseg.audit_cli` | ``audit`` |
"""

from __future__ import annotations

import sys

import typer

from privseg import audit_cli, commands
from privseg.cli_common import VERBOSE
from privseg.federated import cli as federated_cli
from privseg.results import cli as results_cli
from privseg.sweeps import cli as sweeps_cli

app = typer.Typer(
    name="privseg",
    help="Train and benchmark medical image segmentation models under differential privacy.\n\n"
    "Start with:  privseg train phantom2d   (built-in phantom data, CPU is fine)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show dependencies' INFO logs and warnings (Flower, "
                                       "MONAI, Opacus); quiet by default")) -> None:
    """Dependency logs and warnings stay quiet unless --verbose (privseg's own are shown)."""
    VERBOSE["on"] = verbose
    if verbose:
        return
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="monai|opacus|flwr")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    for name in ("flwr", "ray", "monai", "opacus"):
        logging.getLogger(name).setLevel(logging.WARNING)


app.add_typer(commands.app)
app.add_typer(commands.data_app, name="data")
app.add_typer(sweeps_cli.app)
app.add_typer(results_cli.app)
app.add_typer(federated_cli.app, name="federated")
app.add_typer(audit_cli.app)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="privseg")


if __name__ == "__main__":
    sys.exit(main())
