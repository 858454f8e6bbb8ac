"""Deployment: one server process, one process per clinic, over Flower's gRPC transport.

The server runs :class:`~privseg.federated.server.FederatedServer` (the object the simulation
runs) through ``flwr.server.start_server``; each site runs its
:class:`~privseg.federated.client.SiteClient` (the object the simulation runs) through
``flwr.client.start_client``. These are Flower's direct gRPC entry points (deprecated in favour
of SuperLink/SuperNode deployments since flwr 1.13, still shipped and working in 1.41): they
keep the strategy and the sites in long-lived processes, so a site's DP optimizer and
accountant persist across rounds exactly as in the simulation. TLS: the server takes
``(CA certificate, server certificate, server key)`` and the sites the CA certificate. Node
authentication is a SuperLink feature that this transport does not offer (see the README).
Secure aggregation (SecAgg+) needs Flower's message-based SuperLink/SuperNode runtime and is
refused here (:func:`refuse_secure_aggregation`); it runs in the simulation only.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from pathlib import Path

from privseg.config import ConfigError, RunConfig
from privseg.datasets import load_dataset
from privseg.dp.accounting import MAX_DEFAULT_DELTA
from privseg.dp.ledger import SiteLedger
from privseg.dp.randomness import refuse_replayable_noise
from privseg.federated.client import SiteClient
from privseg.federated.deadline import checked_round_timeout
from privseg.federated.server import deployment_record, make_server
from privseg.federated.sites import build_site, partition
from privseg.federated.supernode import (
    agreement_id,
    ledger_path,
    refuse_moved_state,
    run_spend,
)
from privseg.record import run_dir, write_record
from privseg.training.setup import default_cache_dir, seed_everything

log = logging.getLogger("privseg")


def refuse_secure_aggregation(cfg: RunConfig) -> None:
    """Stop a deployment asked for SecAgg+: this transport cannot run it (see the README).

    Running it anyway would be worse than refusing: the strategy would leave clipping to sites
    that, over ``start_client``, have no clipping mod, and the record would claim SecAgg+.
    """
    if cfg.setting.federated.secure_aggregation:
        raise ConfigError("setting.federated.secure_aggregation=true runs in the simulation "
                          "and on SuperLink/SuperNode only (privseg federated run / "
                          "supernode): the legacy gRPC deployment (start_server/start_client) "
                          "cannot run Flower's SecAgg+ workflow")


def run_server(cfg: RunConfig, address: str, n_sites: int,
               certificates: tuple[bytes, bytes, bytes] | None = None,
               round_timeout: float | None = None, output_dir: str | None = None,
               allow_reproducible_noise: bool = False) -> dict:
    """Serve the federation on ``address`` until all rounds and the final test are done.

    A config with ``privacy.noise_seed`` is refused unless ``allow_reproducible_noise``: in
    site mode this server draws the DP-FedAvg noise and the site-sampling coins, and over this
    transport a site never sees the server's config, so it could not refuse replayable noise
    itself (a SuperNode does: the seed is part of the config it agreed to)."""
    import flwr
    from flwr.server import ServerConfig

    refuse_secure_aggregation(cfg)
    round_timeout = checked_round_timeout(round_timeout)
    if not allow_reproducible_noise:
        refuse_replayable_noise(cfg, "server")
    seed_everything(cfg.seed)
    server = make_server(cfg, n_sites)
    t0 = time.perf_counter()
    flwr.server.start_server(
        server_address=address, server=server,
        config=ServerConfig(num_rounds=cfg.setting.federated.rounds, round_timeout=round_timeout),
        certificates=certificates)
    record = deployment_record(cfg, server, time.perf_counter() - t0,
                               "deployment (gRPC, one process per site)",
                               {"address": address, "tls": certificates is not None})
    out = run_dir(output_dir or cfg.output.dir, record["run_id"])
    write_record(out, record)
    log.info("record: %s", out / "record.json")
    return record


def wait_for_server(address: str, max_wait_time: float | None, poll_s: float = 0.5) -> None:
    """Wait until ``address`` (host:port) accepts TCP connections, for at most ``max_wait_time``.

    Flower's legacy ``start_client`` gives up at once when the server is not yet listening
    (gRPC ``UNAVAILABLE`` on its first read), whatever its ``max_wait_time``: a site started a
    moment before its server would exit instead of joining.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + (max_wait_time if max_wait_time is not None else 0.0)
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=poll_s):
                return
        except OSError:
            if time.monotonic() >= deadline:
                return  # let Flower report the failure in its own words
            time.sleep(poll_s)


def run_site(cfg: RunConfig, site: str, server_address: str, data_root: str | None = None,
             root_certificates: bytes | None = None, max_wait_time: float | None = None,
             allow_reproducible_noise: bool = False, budget_epsilon: float | None = None,
             budget_delta: float = MAX_DEFAULT_DELTA,
             state_dir: Path | str | None = None, trust_server: bool = False) -> None:
    """Serve one site's data to the federation: train and evaluate locally when asked.

    A config with ``privacy.noise_seed`` is refused unless ``allow_reproducible_noise``. The
    run's planned spend is charged to the site's ledger (as a SuperNode's runs are) before the
    site connects; past ``budget_epsilon`` it is refused."""
    import flwr

    refuse_secure_aggregation(cfg)
    if not allow_reproducible_noise:
        refuse_replayable_noise(cfg, f"site {site}")
    d = cfg.dataset
    root = data_root if data_root is not None else d.root
    subject_set = load_dataset(d.name, d.options, root,
                               Path(d.cache_dir) if d.cache_dir else default_cache_dir())
    data = build_site(cfg, subject_set, site)
    client = SiteClient(cfg, data, subject_set)
    refuse_moved_state([cfg], site, state_dir)
    ledger = SiteLedger(ledger_path(site, state_dir), budget_epsilon, budget_delta,
                        trusted_server=trust_server)
    n_sites = len(set(partition(cfg, subject_set)[0].values()))
    # the legacy transport has no run id: each process is one run
    total = ledger.charge(f"legacy-{uuid.uuid4().hex[:12]}", agreement_id(cfg),
                          run_spend(cfg, client, n_sites))
    log.info("site %s: %s subjects (train/val/test), connecting to %s; ledger: composed ε = "
             "%.4g", site, data.counts(), server_address, total)
    wait_for_server(server_address, max_wait_time)
    flwr.client.start_client(server_address=server_address, client=client.to_client(),
                             insecure=root_certificates is None,
                             root_certificates=root_certificates,
                             max_wait_time=max_wait_time)
    eps = client.epsilon()
    log.info("site %s done: %d local steps, ε = %s", site, client.steps_done, eps)
