"""The round deadline (``--round-timeout``), checked in one place for every entry point.

This module imports nothing, so the CLI can check the option while parsing it.
"""

from __future__ import annotations

from privseg.errors import ConfigError


def checked_round_timeout(value: float | None) -> float | None:
    """Return ``value`` (seconds a round waits for the sites' replies; ``None``: no limit).

    A deadline of zero or less is refused (``ConfigError``): Flower's legacy server would miss
    every reply of every round, and a deployed run stores 0 as "no limit", the opposite of
    what was asked. The CLI, :func:`~privseg.federated.federation.run_federation`,
    :func:`~privseg.federated.deploy.run_server`, the testbed and the ServerApp's run config
    all pass through here, so a programmatic caller is refused as the command line is.
    """
    if value is None:
        return None
    if not float(value) > 0:
        raise ConfigError(f"round timeout must be a positive number of seconds, got {value}")
    return float(value)
