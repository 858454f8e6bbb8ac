"""Opacus' accountants (``opacus.accountants``), importable without torch.

``privseg privacy`` and σ calibration need only the accountants' maths (NumPy and SciPy), but
``import opacus.accountants`` first runs ``opacus/__init__``, which imports the
GradSampleModule, the PrivacyEngine and torch: about 85% of a ``privseg privacy`` call's
6-8 s on a 2-core CPU. Inside the package, ``opacus/accountants/accountant.py`` imports
``DPOptimizer`` for one type hint and for ``get_optimizer_hook_fn`` (which attaches an
accountant to a DP optimizer), and ``utils.py`` reaches the registry as
``opacus.accountants``; nothing else there touches torch.

:func:`opacus_accountants` returns Opacus' accountant package:

- the real ``opacus.accountants`` when ``opacus`` is already imported (a training process);
- otherwise the *same source files* of the installed Opacus (``opacus/accountants/**``),
  executed unchanged as the private package :data:`PRIVATE_NAME`. For the duration of that
  load only, ``opacus.optimizers`` is a placeholder module whose ``DPOptimizer`` is an empty
  class (the private copies are never attached to an optimizer, so it is only ever a type
  hint) and ``opacus.accountants`` is the private package itself. Both names are removed from
  ``sys.modules`` afterwards, so a later ``import opacus`` imports the real package, and two
  copies of the accountants then coexist (same code, same numbers; ``tests/
  test_privacy_accounting.py`` checks the private copy's ε and σ against Opacus imported
  normally). ``scipy.signal``, unless already imported, is a placeholder during the load
  too, whose ``convolve`` imports the real one when first called (:func:`_convolve`).

The trade-off against caching calibrations on disk: this answers any new query quickly and
stays exactly Opacus' code, at the price of depending on Opacus' file layout (a layout change
fails loudly at the load, naming the file).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: the private package's name in ``sys.modules``
PRIVATE_NAME = "privseg.dp._opacus_accountants"
#: the submodules loaded (``utils``: Opacus' ``get_noise_multiplier``, which the tests hold
#: privseg's σ search to; RDP analysis; PRV analysis)
SUBMODULES = ("utils", "analysis.rdp", "analysis.prv")


def opacus_accountants(torch_free: bool | None = None) -> ModuleType:
    """Opacus' ``accountants`` package with :data:`SUBMODULES` imported.

    ``torch_free``: ``None`` picks the real package when ``opacus`` is already imported and
    the private, torch-free copy otherwise; ``True`` / ``False`` force one (tests).
    """
    if torch_free is None:
        torch_free = "opacus" not in sys.modules
    if not torch_free:
        package = importlib.import_module("opacus.accountants")
        for sub in SUBMODULES:
            importlib.import_module(f"opacus.accountants.{sub}")
        return package
    return sys.modules.get(PRIVATE_NAME) or _load_private()


def _convolve(*args, **kwargs):
    """``scipy.signal.convolve``, imported at its first call: Opacus' PRV composition imports
    it at load, to compose two *different* PRVs only (a run whose σ or q changed), and
    ``import scipy.signal`` (it pulls in scipy.stats) is ~1.5 s of a 2-core CPU's cold
    ``privseg privacy``. Same function, so same numbers."""
    from scipy.signal import convolve

    return convolve(*args, **kwargs)


class _DPOptimizerPlaceholder:
    """Stands for ``opacus.optimizers.DPOptimizer`` while the private copy loads: the
    accountants name it in a type hint and in ``get_optimizer_hook_fn`` only."""


def _load_private() -> ModuleType:
    spec = importlib.util.find_spec("opacus")  # locates the package without running it
    if spec is None or spec.origin is None:
        raise ImportError("opacus is not installed: privseg's accounting needs it")
    folder = Path(spec.origin).parent / "accountants"
    for sub in ("accountant", "rdp", "prv", "utils"):
        if not (folder / f"{sub}.py").is_file():
            raise ImportError(f"{folder / sub}.py: not found; this Opacus lays out its "
                              "accountants differently (use opacus_accountants(torch_free=False))")
    # The package's __init__ is not run: it also imports the Gaussian (GDP) accountant, whose
    # scipy.stats / scipy.optimize imports cost more than the rest together; privseg uses PRV
    # and RDP only.
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(
        PRIVATE_NAME, None, is_package=True))
    package.__spec__.submodule_search_locations = [str(folder)]
    package.__path__ = [str(folder)]
    placeholder = ModuleType("opacus.optimizers")
    placeholder.DPOptimizer = _DPOptimizerPlaceholder
    during_load = {"opacus.optimizers": placeholder, "opacus.accountants": package}
    if "scipy.signal" not in sys.modules:
        signal = ModuleType("scipy.signal")
        signal.convolve = _convolve
        during_load["scipy.signal"] = signal
    # Opacus' own entries, if it is imported (a forced private load), are put back after
    saved = {name: sys.modules[name] for name in during_load if name in sys.modules}
    sys.modules.update(during_load)
    sys.modules[PRIVATE_NAME] = package
    try:
        accountant = importlib.import_module(f"{PRIVATE_NAME}.accountant")
        rdp = importlib.import_module(f"{PRIVATE_NAME}.rdp")
        prv = importlib.import_module(f"{PRIVATE_NAME}.prv")
        package.IAccountant = accountant.IAccountant
        package.RDPAccountant, package.PRVAccountant = rdp.RDPAccountant, prv.PRVAccountant
        mechanisms = {cls.mechanism(): cls for cls in (rdp.RDPAccountant, prv.PRVAccountant)}

        def create_accountant(mechanism: str):
            """Opacus' ``create_accountant`` for the mechanisms loaded here (rdp, prv)."""
            if mechanism not in mechanisms:
                raise ValueError(f"no accountant {mechanism!r} in the torch-free copy; "
                                 f"loaded: {', '.join(mechanisms)}")
            return mechanisms[mechanism]()

        package.create_accountant = create_accountant  # what utils.py imports
        for sub in SUBMODULES:
            importlib.import_module(f"{PRIVATE_NAME}.{sub}")
    except BaseException:
        for name in [n for n in sys.modules if n.startswith(PRIVATE_NAME)]:
            del sys.modules[name]
        raise
    finally:
        for name in during_load:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return package
