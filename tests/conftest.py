"""Test-wide settings: no network, no W&B server, deterministic CPU torch."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
# a site's ledger and trained-runs list (privseg.federated.supernode.site_state_dir): never the
# user's own; processes started by module-scoped fixtures inherit this one
os.environ["PRIVSEG_SITE_STATE"] = tempfile.mkdtemp(prefix="privseg-site-state-")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep W&B and caches of each test inside its tmp dir."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("PRIVSEG_SITE_STATE", str(tmp_path / "site-state"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second torch thread only adds contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
