"""The federation operator's side of a SuperLink deployment: submit a run, collect its record.

:func:`run_federation` hands privseg's Flower App (:data:`privseg.federated.app.APP_DIR`) to
``flwr run`` with the whole run config, the number of sites and the record folder as the run's
config, streams the run's log, and reads the record the ``ServerApp`` wrote
(``OUTPUT_DIR/RUN_ID/record.json``, the simulation's format). The ``ServerApp`` runs next to the
SuperLink, so the record folder is on the SuperLink's machine: run this command there (or give
``--output`` a folder both can reach).

The SuperLink connection is either a named connection of the operator's own Flower
configuration (``$FLWR_HOME/config.toml``), or, by default, one written to a private temporary
``FLWR_HOME`` from ``--superlink`` and ``--ca-cert``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from privseg.config import ConfigError, RunConfig
from privseg.federated.app import APP_DIR, CONFIG_KEY, OUTPUT_KEY, SITES_KEY, TIMEOUT_KEY
from privseg.federated.deadline import checked_round_timeout
from privseg.federated.progress import record_from_progress
from privseg.record import read_any_record, run_dir

CONNECTION = "privseg"
#: seconds to wait for the record once ``flwr run`` ended: it can end just before the file lands
RECORD_GRACE_S = 30.0
#: seconds to keep waiting for the record when ``flwr`` lost the SuperLink after the run
#: started: the SuperLink restarts on its database and the ServerApp and sites carry on
LOST_CONNECTION_WAIT_S = 600.0



def flower_command(name: str) -> str:
    """Path of one of Flower's commands (``flwr``, ``flower-supernode``, ...).

    Looked up beside the running Python first (a virtual environment's ``bin/`` also when it is
    not activated, as under ``python -m pytest``), then on ``PATH``.
    """
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` is neither beside {sys.executable} nor on PATH "
                                "(it comes with flwr)")
    return found


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: this Python's ``bin/`` first on ``PATH``, so
    that the processes they start (``flwr-clientapp``, ``flwr-serverapp``) are found too."""
    env = dict(os.environ, **extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env

def toml_value(value: object) -> str:
    """A TOML literal for a str/int/float/bool (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_toml(cfg: RunConfig, n_sites: int, output_dir: Path,
                    round_timeout: float | None) -> str:
    """The ``flwr run --run-config`` file: privseg's config and where the record goes."""
    values = {CONFIG_KEY: json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
              SITES_KEY: int(n_sites), OUTPUT_KEY: str(output_dir),
              TIMEOUT_KEY: float(round_timeout or 0.0)}
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def connection_toml(superlink: str, root_certificates: Path | None) -> str:
    """A Flower configuration with one SuperLink connection (TLS unless no CA certificate)."""
    lines = ["[superlink]", f"default = {toml_value(CONNECTION)}", "",
             f"[superlink.{CONNECTION}]", f"address = {toml_value(superlink)}"]
    if root_certificates is not None:
        lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def run_federation(cfg: RunConfig, n_sites: int, *, superlink: str | None = None,
                   root_certificates: Path | None = None, connection: str | None = None,
                   output_dir: str | Path | None = None, round_timeout: float | None = None,
                   timeout: float | None = None, log_path: Path | None = None,
                   lost_wait: float = LOST_CONNECTION_WAIT_S) -> dict:
    """Run ``cfg`` on the SuperLink's federation of ``n_sites`` sites; return its record.

    The run's outcome is its record, not ``flwr``'s exit status: when ``flwr run`` exits
    non-zero after the run started (it loses its stream when the SuperLink restarts, while the
    ServerApp and the sites carry on), the record of this Flower run is awaited up to
    ``lost_wait`` seconds. Raises ``RuntimeError`` (with the end of ``flwr``'s output) if the
    run never started, wrote a failed record (its error and rounds done), or left no record.
    """
    from privseg.federated.secagg import refuse_sampled_site_dp, secagg_plan

    round_timeout = checked_round_timeout(round_timeout)
    refuse_sampled_site_dp(cfg)  # refuse before submitting
    if cfg.setting.federated.secure_aggregation:
        secagg_plan(cfg, n_sites)
    if (superlink is None) == (connection is None):
        raise ConfigError("give either a SuperLink address (--superlink) or a named Flower "
                          "connection (--connection)")
    flwr = flower_command("flwr")
    output = Path(output_dir or cfg.output.dir).resolve()
    with tempfile.TemporaryDirectory(prefix="privseg-flwr-") as tmp:
        env = flower_env()
        if connection is None:
            env["FLWR_HOME"] = tmp
            (Path(tmp) / "config.toml").write_text(connection_toml(superlink, root_certificates))
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(run_config_toml(cfg, n_sites, output, round_timeout))
        cmd = [flwr, "run", str(APP_DIR), connection or CONNECTION, "--run-config",
               str(overrides), "--stream"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)  # noqa: S603
        out = proc.stdout + proc.stderr
        if log_path is not None:
            Path(log_path).write_text(out)
        m = re.search(r"Successfully started run (\d+)", out)
        if m is None:
            raise RuntimeError(f"`flwr run` failed (exit {proc.returncode}):\n{out[-3000:]}")
        flower_run, directory = int(m.group(1)), run_dir(output, cfg.run_id())
        wait = RECORD_GRACE_S if proc.returncode == 0 else max(lost_wait, RECORD_GRACE_S)
        record = await_record(
            directory, flower_run, wait,
            still_running=lambda: run_is_live(flwr, connection or CONNECTION, env, flower_run),
            longest=max(lost_wait, RECORD_GRACE_S))
    if record is None:  # the ServerApp was killed: its progress is the record of the spend
        record = record_from_progress(
            directory, flower_run,
            f"no record within {wait:g} s of `flwr run` ending (exit {proc.returncode})")
    if record is None:
        raise RuntimeError(f"Flower run {flower_run} left no record in {directory} within "
                           f"{wait:g} s of `flwr run` ending (exit {proc.returncode}); its log "
                           f"ends:\n{out[-3000:]}")
    if record.get("status") != "complete":
        raise RuntimeError(f"Flower run {flower_run} failed after {record.get('rounds_done')} "
                           f"round(s): {record.get('error')} (its record of what was spent: "
                           f"{directory})")
    return record


def run_is_live(flwr: str, connection: str, env: dict[str, str], flower_run: int) -> bool:
    """Whether the SuperLink says Flower run ``flower_run`` is still pending, starting or
    running (``flwr ls --run-id``); False when it cannot be asked."""
    try:
        p = subprocess.run([flwr, "ls", connection, "--run-id", str(flower_run), "--format",
                            "json"], env=env, capture_output=True, text=True, timeout=60,
                           check=False)  # noqa: S603
        status = json.loads(p.stdout)["runs"][0]["status"]
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError, TypeError):
        return False
    return str(status).split(":")[0] in ("pending", "starting", "running")


def await_record(directory: Path, flower_run: int, wait: float, poll_s: float = 0.5,
                 still_running=None, longest: float | None = None,
                 recheck_s: float = 10.0) -> dict | None:
    """The record (complete or failed) that Flower run ``flower_run`` wrote in ``directory``,
    polled for up to ``wait`` seconds, and on while ``still_running()`` says the run goes on
    (``flwr run`` can end its stream, exit 0, while the ServerApp is still at work: seen
    while it awaited a lost site), up to ``longest`` seconds in all; None if none came
    (another run's record is ignored). The run's status is asked every ``recheck_s``."""
    start = time.monotonic()
    deadline = start + wait
    while True:
        record = read_any_record(directory)
        transport = (record or {}).get("federated", {}).get("transport", {})
        if transport.get("flower_run_id") == flower_run:
            return record
        now = time.monotonic()
        if now > deadline:
            if (still_running is None or now - start > (longest or wait)
                    or not still_running()):
                return None
            deadline = now + recheck_s
        time.sleep(poll_s)
