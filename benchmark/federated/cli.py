"""``privseg federated server|site|simulate``: deploy or simulate a federated run."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Annotated

import typer

from privseg.cli_common import fail, quiet_flower
from privseg.errors import ConfigError

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


def _positive_seconds(value: float | None) -> float | None:
    """The option's check (:func:`~privseg.federated.deadline.checked_round_timeout`), as a
    parsing error."""
    from privseg.federated.deadline import checked_round_timeout

    try:
        return checked_round_timeout(value)
    except ConfigError:
        raise typer.BadParameter(f"must be a positive number of seconds, got {value}") from None


RoundTimeoutOpt = Annotated[float | None, typer.Option(
    callback=_positive_seconds,
    help="seconds a round's training and evaluation calls wait for the sites' replies "
         "(a site not in by then is missed for that round); default: no limit")]


def _load(config: str, set_: list[str] | None):
    from privseg.config import load_config

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
    round_timeout: RoundTimeoutOpt = None,
    output: Annotated[str | None, typer.Option(help="record folder (default output.dir)")] = None,
    allow_reproducible_noise: AllowNoiseOpt = False,
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
    try:
        record = run_server(cfg, address, sites, certificates, round_timeout, output,
                            allow_reproducible_noise)
    except ValueError as e:
        fail(str(e), code=1)
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
    from privseg.cli_common import show_info_logs
    from privseg.federated.supernode import serve_site

    configs = [_load(c, set_) for c in config]
    show_info_logs()  # the site's log: data loaded, ledger, each message answered
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
    round_timeout: RoundTimeoutOpt = None,
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


@app.command()
def testbed(
    config: Annotated[str, typer.Argument(help="federated run config (YAML file); its "
                                               "setting.federated.links shapes each site's link")],
    sites: Annotated[int, typer.Option(help="number of sites (the config's partition's)")] = 3,
    workdir: Annotated[Path | None, typer.Option(
        help="folder for the testbed's logs, certificates and SuperLink database "
        "(default: a new temporary one, removed afterwards)")] = None,
    fault: Annotated[list[str] | None, typer.Option(
        help="fault to inject, KIND[:SITE]@ROUND[+SECONDS]: kill:site-B@2, "
        "restart:site-B@2+0, linkdown:site-B@2+20, straggle:site-C@2+40, superlink@2+5")]
    = None,
    netns: Annotated[bool, typer.Option(
        help="sites in network namespaces when root (--no-netns: loopback relays only)")]
    = True,
    round_timeout: RoundTimeoutOpt = None,
    max_wait: Annotated[float, typer.Option(
        help="a SuperNode retries its activation this long (s)")] = 300.0,
    lost_wait: Annotated[float, typer.Option(
        help="seconds to await the record when the SuperLink was lost")] = 600.0,
    output: Annotated[str | None, typer.Option(help="record folder (default output.dir)")]
    = None,
    pacs: Annotated[bool, typer.Option(
        help="one Orthanc per site (in its namespace) holding the config's data set as DICOM "
             "MR + SEG; the sites read their subjects from it over DICOMweb")] = False,
) -> None:
    """Run the federation on this machine: SuperLink, one SuperNode per site, shaped links.

    Each site in its own network namespace (root) behind a userspace relay that shapes what
    the kernel does not and counts the bytes on the link; prints which mechanism shapes what;
    the record gets links (bytes and times per round per site) and testbed (faults) sections.
    Everything started is stopped on exit and on Ctrl-C.

    Example:  privseg federated testbed study.yaml --sites 3 --fault kill:site-B@2
    """
    import signal
    import tempfile

    from privseg.federated.testbed import Fault, run_testbed

    if not Path(config).is_file():
        fail(f"{config}: the testbed needs a config file (its SuperNodes load it)")
    cfg = _load(config, None)
    try:
        faults = [Fault.parse(f) for f in fault or []]
    except ConfigError as e:
        fail(str(e))

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="privseg-tb-")
    try:
        record = run_testbed(cfg, Path(config).resolve(), sites,
                             Path(workdir or tmp.name), faults=faults, use_netns=netns,
                             round_timeout=round_timeout, max_wait=max_wait,
                             lost_wait=lost_wait,
                             output_dir=Path(output) if output else None, log=typer.echo,
                             pacs=pacs)
    except (ConfigError, RuntimeError, FileNotFoundError, ValueError) as e:
        fail(str(e), code=1)
    finally:
        if tmp is not None:
            tmp.cleanup()
    for r in record["links"]["per_round"]:
        per = "; ".join(f"{s} ↑{v['bytes_up']} ↓{v['bytes_down']} B, last byte up "
                        + (f"{v['last_up_s']:.2f} s" if v["last_up_s"] is not None else "none")
                        for s, v in r["sites"].items())
        typer.echo(f"round {r['round']}: {r['wall_s']:.2f} s; {per}")
    missed = [(h["round"], m["site"]) for h in record["history"] for m in h.get("missed", [])]
    if missed:
        typer.echo("missed: " + ", ".join(f"{s} in round {r}" for r, s in missed))
    typer.echo(f"run {record['run_id']}: {record['status']}; test mean Dice "
               f"{record['test'].get('mean_dice', float('nan')):.4f}; ε per site "
               f"{record['privacy'].get('epsilon_per_site')}")


@app.command("link-sweep")
def link_sweep_cmd(
    config: Annotated[str, typer.Argument(help="federated run config (YAML file or built-in)")],
    bandwidths: Annotated[list[str], typer.Option(
        help="one testbed run's per-site bandwidths in Mbit/s, comma-separated, one per site "
             "in site order ('none': unshaped); repeat for more runs")],
    fractions: Annotated[str, typer.Option(help="share_fraction values, comma-separated")]
    = "1,0.1",
    latency_ms: Annotated[float, typer.Option(help="one-way latency of every link")] = 0.0,
    out: Annotated[Path, typer.Option(help="folder for the CSV and the figure")]
    = Path("results/links"),
    workdir: Annotated[Path | None, typer.Option(help="testbed folders (default: temporary)")]
    = None,
    round_timeout: RoundTimeoutOpt = None,
    netns: Annotated[bool, typer.Option(help="sites in network namespaces when root")] = True,
    set_: SetOpt = None,
) -> None:
    """Round time vs bandwidth on the testbed, full vs partial sharing: a CSV and a figure.

    Rows are appended to an existing CSV in --out, so a sweep can grow by invocations.

    Example:  privseg federated link-sweep phantom2d-federated --bandwidths none,8,2
    --bandwidths 1,0.5,0.25 --fractions 1,0.1
    """
    import tempfile

    from privseg.federated.link_sweep import link_sweep, plot_link_sweep

    cfg = _load(config, set_)
    sites = sorted({f"site-{chr(65 + i)}" for i in range(len(bandwidths[0].split(",")))})

    def parse(text: str) -> dict[str, float | None]:
        vals = [None if v.strip() == "none" else float(v) for v in text.split(",")]
        if len(vals) != len(sites):
            fail(f"--bandwidths {text}: {len(vals)} values for {len(sites)} sites")
        return dict(zip(sites, vals, strict=True))

    sets = [parse(b) for b in bandwidths]
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="privseg-ls-")
    try:
        df = link_sweep(cfg.model_dump(mode="json"), sets,
                        [float(f) for f in fractions.split(",")], Path(workdir or tmp.name),
                        latency_ms=latency_ms, use_netns=netns, round_timeout=round_timeout,
                        log=typer.echo)
    except (ConfigError, RuntimeError, ValueError) as e:
        fail(str(e), code=1)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "round-time-vs-bandwidth.csv"
    if csv.exists():  # points of earlier invocations are kept: the sweep grows
        import pandas as pd

        df = pd.concat([pd.read_csv(csv), df], ignore_index=True)
    df.to_csv(csv, index=False)
    typer.echo(f"wrote {out / 'round-time-vs-bandwidth.csv'} and "
               f"{plot_link_sweep(df, out / 'round-time-vs-bandwidth.png')}")
