"""The torch-free copy of Opacus' accountants (privseg.dp.opacus_accountants) gives exactly
Opacus' numbers, keeps torch off the privacy calculator's path and leaves Opacus importable."""

import json
import subprocess
import sys

import opacus.accountants as real
import opacus.accountants.utils as real_utils
import pytest

from privseg.dp.opacus_accountants import PRIVATE_NAME, opacus_accountants

HISTORY = [(1.1, 0.05, 120), (1.5, 0.2, 15)]


@pytest.mark.filterwarnings("ignore:Optimal order is the")  # Opacus' default orders, both sides
def test_private_copy_is_not_opacus_and_equals_it():
    """Same ε (PRV, RDP) and same σ from ``get_noise_multiplier`` as Opacus imported normally,
    from distinct classes (so the comparison is not of a module with itself)."""
    light = opacus_accountants(torch_free=True)
    assert light.PRVAccountant is not real.PRVAccountant
    assert light.__name__ == PRIVATE_NAME
    for name in ("PRVAccountant", "RDPAccountant"):
        a, b = getattr(light, name)(), getattr(real, name)()
        a.history, b.history = list(HISTORY), list(HISTORY)
        assert a.get_epsilon(delta=1e-5) == b.get_epsilon(delta=1e-5)
    kw = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=50)
    for accountant in ("rdp", "prv"):
        assert (light.utils.get_noise_multiplier(accountant=accountant, **kw)
                == real_utils.get_noise_multiplier(accountant=accountant, **kw))
    with pytest.raises(ValueError, match="no accountant 'gdp'"):
        light.create_accountant("gdp")


_NUMBERS = (
    "import json, sys\n"
    "import privseg.dp.accounting as acc\n"
    "out = {'sigma': acc.calibrate_noise(4.0, 1e-5, 0.1, 60, 'prv'),\n"
    "       'eps_prv': acc.epsilon_for(1.3, 0.1, 60, 1e-5, 'prv'),\n"
    "       'eps_rdp': acc.epsilon_for(1.3, 0.1, 60, 1e-5, 'rdp'),\n"
    "       'torch': 'torch' in sys.modules, 'backend': acc.PRVAccountant.__module__,\n"
    "       'opacus': sorted(m for m in sys.modules if m.startswith('opacus')),\n"
    "       'scipy_signal': 'scipy.signal' in sys.modules}\n"
    "from opacus.optimizers import DPOptimizer\n"
    "out['optimizer'] = DPOptimizer.__module__\n"
    "import scipy.signal\n"
    "out['signal'] = scipy.signal.convolve.__module__\n"
    "print(json.dumps(out))\n")


def _numbers(first: str) -> dict:
    done = subprocess.run([sys.executable, "-c", first + _NUMBERS], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_privacy_path_imports_no_torch_and_same_numbers():
    """In a fresh process privseg's calibration and accounting (what ``privseg privacy`` runs)
    import neither torch nor Opacus nor scipy.signal, leave no ``opacus.*`` or scipy.signal
    placeholder behind (later imports are the real ones) and give bit-for-bit the σ and ε
    of a process where privseg's accounting runs on Opacus imported normally."""
    light = _numbers("")
    assert light["torch"] is False and light["opacus"] == []
    assert light["backend"].startswith(PRIVATE_NAME)
    assert light["optimizer"].startswith("opacus.optimizers")
    # scipy.signal (for composing different PRVs) is not imported for one (σ, q); a later
    # import of it is the real module, not the load's placeholder
    assert light["scipy_signal"] is False and light["signal"].startswith("scipy.signal")
    normal = _numbers("import opacus.accountants\n")
    assert normal["torch"] is True and normal["backend"].startswith("opacus.accountants")
    for key in ("sigma", "eps_prv", "eps_rdp"):
        assert light[key] == normal[key], key
