"""The one ClientApp a privseg site runs: privseg's own, whatever App bundle a run names.

Flower's SuperNode installs the App bundle (FAB) each run names and runs the ClientApp that
bundle declares, as the site's user: an operator who submits a bundle of its own (same name,
its own ``clientapp``) runs its code at every site, with the site's data, the worker's key and
its socket in reach, past the agreement id, the ledger and every cap of the worker. So a
privseg SuperNode finds this program first on its ``PATH`` as ``flwr-clientapp`` (Flower's
SuperExec starts that command by name for each task): it runs Flower's own ``flwr-clientapp``
with the loader replaced. A bundle whose ``clientapp`` is not privseg's is refused, and
privseg's ClientApp is imported from the privseg installed at the site, never from the
bundle (whose files are unpacked but never imported).

Flower offers no extension point for the loader (``run_clientapp`` calls
``get_load_client_app_fn`` itself), hence the replacement of that one name in its module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

#: the ``[tool.flwr.app.components] clientapp`` of privseg's App (``flower_app/pyproject.toml``)
CLIENTAPP_REF = "privseg.federated.app:client_app"


def check_bundle(project_dir: Path) -> None:
    """Raise Flower's ``LoadClientAppError`` unless the installed bundle in ``project_dir``
    names privseg's ClientApp."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.config import get_project_config

    try:
        ref = get_project_config(project_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
    except Exception as e:  # noqa: BLE001 - any unreadable bundle is refused
        raise LoadClientAppError(f"this privseg site runs privseg's ClientApp only; the run's "
                                 f"App bundle names none ({type(e).__name__}: {e})") from None
    if ref != CLIENTAPP_REF:
        raise LoadClientAppError(f"this privseg site runs privseg's ClientApp only "
                                 f"({CLIENTAPP_REF}); the run's App bundle names {ref!r}")


def pinned_load_client_app_fn(*args, **kwargs) -> Callable[[str, str, str], object]:
    """Stands in for ``flwr.clientapp.utils.get_load_client_app_fn``: a loader that checks the
    run's bundle (:func:`check_bundle`) and returns privseg's ClientApp from the installed
    package."""
    from flwr.common.config import get_project_dir

    def load(fab_id: str, fab_version: str, fab_hash: str):
        check_bundle(get_project_dir(fab_id, fab_version, fab_hash))
        from privseg.federated.app import client_app

        return client_app

    return load


def main() -> None:
    """``flwr-clientapp`` with the pinned loader (the command line is Flower's)."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    runtime.get_load_client_app_fn = pinned_load_client_app_fn
    flwr_clientapp()


def install_shim(folder: Path) -> Path:
    """Write ``folder/flwr-clientapp`` (mode 0700) running :func:`main` with this Python, for
    the front of the SuperNode's ``PATH``; return ``folder``."""
    shim = folder / "flwr-clientapp"
    shim.write_text(f"#!{sys.executable}\nfrom privseg.federated.pinned_clientapp import main\n"
                    "main()\n")
    os.chmod(shim, 0o700)
    return folder
