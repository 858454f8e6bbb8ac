"""``privseg federated server|site|simulate``: deploy or simulate a federated run."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Annotated

import typer

from privseg.cli_common import fail, quiet_flower
from privseg.config import ConfigError, load_config

app = typer.Typer(help="Federated training on Flower: server, site, simulation.",
                  no_args_is_help=True)

AllowNoiseOpt = Annotated[bool, typer.Option(
    help="accept a config with privacy.noise_seed (its DP noise is then replayable by whoever "
         "holds the config): for loopback tests and benchmarks, never for patients' data")]
BudgetOpt = Annotated[float | None, typer.Option(
    help="this site's total privacy budget ε over all runs on its data (composed in its "
         "ledger: the Gaussian runs' ε at --budget-delta plus the SVT runs' pure ε); a run "
         "that would exceed it is refused before training")]
BudgetDeltaOpt = Annotated[float, typer.Option(help="δ at which the ledger composes")]
TrustServerOpt = Annotated[bool, typer.Option(
    help="under --budget-epsilon, accept site-level DP runs, whose raw updates the server "
         "sees (against the server their ε is ∞): only for a server this site trusts")]
StateDirOpt = Annotated[Path | None, typer.Option(
    envvar="PRIVSEG_SITE_STATE",
    help="folder of this site's privacy ledger and trained-runs list (default "
         "~/.local/state/privseg): one per site machine, whatever the run config")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key, e.g. --set setting.federated.rounds=5")]


def _load(config: str, set_: list[str] | None):
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        fail(str(e))
    if cfg.setting.kind != "federated":
        fail(f"{config}: setting.kind must be federated")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler
    warnings.filterwarnings("ignore", module="opacus")
    quiet_flower()
    return cfg


@app.command()
def server(
    config: Annotated[str, typer.Argument(help="federated run config (YAML or built-in name)")],
    address: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0:8080",
    sites: Annotated[int, typer.Option(help="number of sites that will connect")] = 3,
    ca_cert: Annotated[Path | None, typer.Option(help="TLS: CA certificate (PEM)")] = None,
    cert: Annotated[Path | None, typer.Option(help="TLS: server certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="TLS: server private key (PEM)")] = None,
    round_timeout: Annotated[float | None, typer.Option(help="seconds per round")] = None,
    output: Annotated[str | None, typer.Option(help="record folder (default output.dir)")] = None,
    set_: SetOpt = None,
) -> None:
    """Legacy transport (Flower start_server): the server; no node auth, no SecAgg+.

    Example:  privseg federated server study.yaml --address 0.0.0.0:8080 --sites 3
    """
    from privseg.federated.deploy import run_server

    cfg = _load(config, set_)
    tls = [ca_cert, cert, key]
    if any(tls) and not all(tls):
        fail("TLS needs all of --ca-cert, --cert and --key")
    certificates = tuple(p.read_bytes() for p in tls) if all(tls) else None
    record = run_server(cfg, address, sites, certificates, round_timeout, output)
    p = record["privacy"]
    typer.echo(f"test mean Dice {record['test'].get('mean_dice', float('nan')):.4f}  "
               f"privacy: {p['guarantee']}")


@app.command()
def site(
    config: Annotated[str, typer.Argument(help="the federation's run config (same as server's)")],
    name: Annotated[str, typer.Option("--site", help="this site's name, e.g. site-A")],
    server_address: Annotated[str, typer.Option("--server", help="server HOST:PORT")],
    data: Annotated[str | None, typer.Option(help="this site's data folder (dataset.root)")]
    = None,
    ca_cert: Annotated[Path | None, typer.Option(help="TLS: CA certificate of the server")]
    = None,
    max_wait: Annotated[float | None, typer.Option(help="give up connecting after s")] = None,
    allow_reproducible_noise: AllowNoiseOpt = False,
    budget_epsilon: BudgetOpt = None,
    budget_delta: BudgetDeltaOpt = 1e-5,
    state_dir: StateDirOpt = None,
    trust_server: TrustServerOpt = False,
    set_: SetOpt = None,
) -> None:
    """Legacy transport (Flower start_client): one site; see `supernode` for the current one.

    Example:  privseg federated site study.yaml --site site-A --server hub:8080 --data /data/site-A
    """
    from privseg.federated.deploy import run_site

    cfg = _load(config, set_)
    try:
        run_site(cfg, name, server_address, data,
                 ca_cert.read_bytes() if ca_cert is not None else None, max_wait,
                 allow_reproducible_noise, budget_epsilon, budget_delta, state_dir,
                 trust_server)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(str(e), code=1)


@app.command()
def simulate(
    config: Annotated[str, typer.Argument(help="federated run config")],
    force: Annotated[bool, typer.Option(help="Rerun even if a complete record exists")] = False,
    set_: SetOpt = None,
) -> None:
    """Simulate the federation in one process (what `privseg train` does for it).

    Example:  privseg federated simulate phantom2d-federated --set setting.federated.rounds=5
    """
    from privseg.federated.simulation import run_federated

    cfg = _load(config, set_)
    try:
        record = run_federated(cfg, force=force)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(f"{cfg.name or config}: {e}", code=1)
    t = record["timing"]
    typer.echo(f"run {record['run_id']}: test mean Dice {record['test'].get('mean_dice'):.4f}; "
               f"ε {record['privacy']['epsilon']}; {t['total_s']:.1f}s, overhead "
               f"{100 * (t['simulation_overhead'] or 0):.1f}% over the sites' compute")


# -- SuperLink / SuperNode deployment (Flower's runtime; TLS and node authentication) -------

@app.command()
def supernode(
    config: Annotated[list[str], typer.Argument(
        help="the run config(s) this site agreed to; a run must carry one of them")],
    name: Annotated[str, typer.Option("--site", help="this site's name, e.g. site-A")],
    superlink: Annotated[str, typer.Option(help="SuperLink Fleet API HOST:PORT")],
    data: Annotated[str | None, typer.Option(help="this site's data folder (dataset.root)")]
    = None,
    ca_cert: Annotated[Path | None, typer.Option(
        help="TLS: CA certificate that signed the SuperLink's certificate")] = None,
    auth_key: Annotated[Path | None, typer.Option(
        help="node authentication: this site's EC private key (OpenSSH format); its public "
             "key must be registered on the SuperLink (flwr supernode register)")] = None,
    runtime_port: Annotated[int | None, typer.Option(
        help="local port of the SuperNode's runtime API (default Flower's 9094)")] = None,
    max_wait: Annotated[float | None, typer.Option(help="give up connecting after s")] = None,
    budget_epsilon: BudgetOpt = None,
    budget_delta: BudgetDeltaOpt = 1e-5,
    allow_reproducible_noise: AllowNoiseOpt = False,
    state_dir: StateDirOpt = None,
    trust_server: TrustServerOpt = False,
    set_: SetOpt = None,
) -> None:
    """Serve one site as a Flower SuperNode: its data stay here; it answers every run.

    Starts the site's worker (data loaded from --data) and Flower's flower-supernode; runs
    until stopped. Only model updates (masked with SecAgg+) and aggregate metrics leave.
    Every run that trains here is charged to the site's ledger first (see `privseg federated
    ledger`). Example:

        privseg federated supernode study.yaml --site site-A --superlink hub:9092
        --data /data/feta --ca-cert ca.pem --auth-key site-A.key --budget-epsilon 10
    """
    from privseg.federated.supernode import serve_site

    configs = [_load(c, set_) for c in config]
    try:
        code = serve_site(configs, name, superlink, data, ca_cert, auth_key, runtime_port,
                          max_wait, budget_epsilon, budget_delta, allow_reproducible_noise,
                          state_dir, trust_server)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        fail(str(e), code=1)
    raise typer.Exit(code)


@app.command()
def ledger(
    name: Annotated[str, typer.Option("--site", help="this site's name, e.g. site-A")],
    budget_delta: Annotated[float, typer.Option(help="δ at which the ledger composes")] = 1e-5,
    state_dir: StateDirOpt = None,
) -> None:
    """Print this site's privacy ledger: every run trained on its data and the composed ε.

    Example:  privseg federated ledger --site site-A --state-dir /var/lib/privseg
    """
    from privseg.dp.ledger import SiteLedger
    from privseg.federated.supernode import ledger_path

    try:
        typer.echo(SiteLedger(ledger_path(name, state_dir), budget_delta=budget_delta).report())
    except ValueError as e:
        fail(str(e), code=1)


@app.command("run")
def run_cmd(
    config: Annotated[str, typer.Argument(help="federated run config (YAML or built-in name)")],
    superlink: Annotated[str | None, typer.Option(
        help="SuperLink HOST:PORT (its Control API; Flower 1.41 serves all APIs on one port)")]
    = None,
    ca_cert: Annotated[Path | None, typer.Option(help="TLS: CA certificate of the SuperLink")]
    = None,
    connection: Annotated[str | None, typer.Option(
        help="instead of --superlink: a named connection of your Flower config")] = None,
    sites: Annotated[int, typer.Option(help="number of sites in the federation")] = 3,
    output: Annotated[str | None, typer.Option(
        help="record folder on the SuperLink's machine (default output.dir)")] = None,
    round_timeout: Annotated[float | None, typer.Option(help="seconds per round")] = None,
    lost_wait: Annotated[float, typer.Option(
        help="seconds to await the run's record when flwr loses the SuperLink (a restart) "
        "after the run started")] = 600.0,
    set_: SetOpt = None,
) -> None:
    """Run the federation on a SuperLink (flwr run) and print the record's summary.

    The outcome is the run's record: a lost connection to the SuperLink (it restarted) is
    not a failure while the run's ServerApp goes on; a failed record is.

    Example:  privseg federated run study.yaml --superlink hub:9093 --ca-cert ca.pem --sites 3
    """
    from privseg.federated.federation import run_federation

    cfg = _load(config, set_)
    if superlink is None and connection is None:
        fail("give --superlink HOST:PORT (with --ca-cert) or --connection NAME")
    try:
        record = run_federation(cfg, sites, superlink=superlink, root_certificates=ca_cert,
                                connection=connection, output_dir=output,
                                round_timeout=round_timeout, lost_wait=lost_wait)
    except (ConfigError, RuntimeError, FileNotFoundError) as e:
        fail(str(e), code=1)
    p = record["privacy"]
    typer.echo(f"run {record['run_id']}: test mean Dice "
               f"{record['test'].get('mean_dice', float('nan')):.4f}  privacy: {p['guarantee']}")
