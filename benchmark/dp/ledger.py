"""A site's privacy ledger: every DP run trained on its data, composed into one total spend.

The same patients take part in every run and every study a site joins, so their privacy loss
composes across runs: a site that answers any number of runs of a config it agreed to, each
spending the full ε, has spent the sum (and more, were the runs' noise related). The ledger is
an append-only JSON-lines file on the site's own disk, each line fsynced before the site
trains in the run, listing what the run may spend (σ, q, steps, δ and its ε alone). A run is
either Gaussian (DP-SGD at the site, DP-FedAvg) or pure ε (the sparse vector technique, dp_mode
svt: ε per round × rounds, δ 0). A run whose planned spend would take the total past the
operator's budget is refused before it trains. A restart reads the file back, so nothing is
spent twice unseen.

The total, at the ledger's δ, is

    ε_total = ε_PRV(all Gaussian runs' steps, δ) + Σ_pure-ε runs ε_per_round · rounds.

Why this is a valid (ε_total, δ) bound: the Gaussian runs' steps, composed by Opacus'
accountant (PRV), are together one (ε_G, δ)-DP mechanism; each pure-ε run is (ε_i, 0)-DP
(basic composition of its rounds, each at most one answer per site); and the composition of
(ε_G, δ)- and (ε_i, 0)-DP mechanisms, even chosen adaptively, is (ε_G + Σ ε_i, δ + 0)-DP (Dwork
& Roth 2014, Thm. 3.16, basic composition). The units compose too: an SVT run's guarantee is
with respect to replacing the site's *whole update* by any other, so it holds for any change of
the site's data, one subject's included (every update is every other's neighbour, and the
update is a function of the data): its ε bounds a subject's loss as well as the site's. The
bound is loose (basic composition of the pure part, and no joint accounting of Gaussian and
Laplace), never optimistic.

Against whom: the total holds against everyone outside the site (the server included) only if
no run showed the server this site's raw updates. A site-level DP run (unit ``site``, DP-FedAvg
with the noise added at the server) does: against the server its subjects have ε = ∞ from that
run, and the total then holds only against those who see the released models. So under a
budget such a run is refused unless the operator trusts the server (``trusted_server``), and
:meth:`SiteLedger.report` prints both totals.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from privseg.dp.accounting import MAX_DEFAULT_DELTA, epsilon_of_history

#: what each kind of run's ε protects, and against whom (the ledger composes them all alike)
UNIT_NOTES = {
    "subject": "each subject, against the server and other sites (DP-SGD at this site)",
    "site": "this site's whole data in the released models only: the server saw its raw updates",
    "svt": "one site's whole update, local DP (SVT: the server need not be trusted)",
}


class BudgetExceeded(RuntimeError):
    """A run would take the site's composed privacy spend past its operator's budget."""


class AlreadyCharged(RuntimeError):
    """A run was charged to the site's ledger before: whoever was charged trains in it."""


@dataclass(frozen=True)
class Spend:
    """What one run may spend on the site's data: its Gaussian steps (σ 0: a non-private run,
    ε = ∞; steps 0: none) and the δ the run itself reports at, or (:meth:`pure`) a pure-ε
    spend of ``pure_rounds`` rounds at ``epsilon_per_round`` each (δ 0)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    unit: str = "subject"
    epsilon_per_round: float = 0.0
    pure_rounds: int = 0

    @classmethod
    def pure(cls, epsilon_per_round: float, rounds: int, unit: str = "svt") -> Spend:
        """A pure ε-DP run (SVT, Lyu, Su & Li 2017): ``rounds`` × ``epsilon_per_round``, δ 0,
        no Gaussian steps."""
        if not epsilon_per_round > 0 or rounds < 1:
            raise ValueError(f"a pure-ε spend needs ε per round > 0 and rounds ≥ 1 (got ε = "
                             f"{epsilon_per_round}, rounds = {rounds})")
        return cls(0.0, 0.0, 0, 0.0, unit, float(epsilon_per_round), int(rounds))

    def history(self) -> list[tuple[float, float, int]]:
        """The run's Gaussian steps as an Opacus accountant history (none for a pure-ε run)."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)] if self.steps else []

    @property
    def pure_epsilon(self) -> float:
        """The run's pure ε by basic composition: ε per round × rounds (0: none)."""
        return self.epsilon_per_round * self.pure_rounds if self.pure_rounds else 0.0


class SiteLedger:
    """The append-only ledger of one site (see the module's docstring).

    ``budget_epsilon`` None records and composes without refusing anything.
    """

    def __init__(self, path: Path, budget_epsilon: float | None = None,
                 budget_delta: float = MAX_DEFAULT_DELTA, accountant: str = "prv",
                 trusted_server: bool = False):
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"--budget-epsilon must be > 0, got {budget_epsilon}")
        if not 0 < budget_delta < 1:
            raise ValueError(f"--budget-delta must be in (0, 1), got {budget_delta}")
        self.path = Path(path)
        self.budget_epsilon = budget_epsilon
        self.budget_delta = budget_delta
        self.accountant = accountant
        #: the operator trusts the server with raw updates (site-level DP runs allowed)
        self.trusted_server = trusted_server
        self.entries: list[dict] = self._read(self.path.read_text()) if self.path.exists() else []

    def _read(self, text: str) -> list[dict]:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: line {n} is not a ledger entry ({e}); the "
                                 "ledger is append-only and must not be edited") from None
        return entries

    def __contains__(self, run_id: object) -> bool:
        return any(e["run_id"] == str(run_id) for e in self.entries)

    def history(self) -> list[tuple[float, float, int]]:
        """Every recorded run's Gaussian steps, composed in order."""
        return [h for e in self.entries for h in _spend(e).history()]

    def pure_epsilon(self) -> float:
        """Every recorded pure-ε run's ε, summed (basic composition)."""
        return sum(_spend(e).pure_epsilon for e in self.entries)

    def spent(self, extra: Spend | None = None) -> float:
        """ε at the ledger's δ of every recorded run (plus ``extra``), composed: the Gaussian
        runs by the accountant plus the pure-ε runs by basic composition (see the module's
        docstring); ∞ once a non-private run trained on the data."""
        history = self.history() + (extra.history() if extra else [])
        pure = self.pure_epsilon() + (extra.pure_epsilon if extra else 0.0)
        return epsilon_of_history(history, self.budget_delta, self.accountant) + pure

    def server_saw_raw_updates(self) -> list[str]:
        """Runs whose raw updates the server saw (site-level DP): against the server, ε = ∞."""
        return [e["run_id"] for e in self.entries if e.get("unit") == "site"]

    def alone(self, spend: Spend) -> float:
        """One run's ε alone at the ledger's δ."""
        return (epsilon_of_history(spend.history(), self.budget_delta, self.accountant)
                + spend.pure_epsilon)

    def charge(self, run_id: object, agreement_id: str, spend: Spend) -> float:
        """Record run ``run_id`` before it trains, or raise :class:`BudgetExceeded`.

        Returns the composed total. The file is locked and read again first, so two workers
        on one site's data cannot both charge against the same earlier total. A run already
        in the ledger raises :class:`AlreadyCharged`: the charge is made once, by the worker
        that then trains in the run, and a second worker (or the same one after a restart)
        would train in it again with its accountant at zero, unseen.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            self.entries = self._read(f.read())
            return self._charge_locked(f, run_id, agreement_id, spend)

    def _charge_locked(self, f, run_id: object, agreement_id: str, spend: Spend) -> float:
        if run_id in self:
            raise AlreadyCharged(
                f"run {run_id} is already in this site's ledger ({self.path}): another worker "
                "on this site's data, or this one before a restart, was charged for it and "
                "trains in it; training in it again would spend the site's data unseen; "
                "refused")
        before = self.spent()
        after = self.spent(spend)
        alone = self.alone(spend)
        if (self.budget_epsilon is not None and spend.unit == "site"
                and not self.trusted_server):
            raise BudgetExceeded(
                f"run {run_id} (agreement {agreement_id}) is site-level DP: the server sees "
                "this site's raw updates and adds the noise itself, so against the server the "
                f"site's subjects would have ε = ∞, past the budget ε = {self.budget_epsilon:g};"
                " refused before training (start the site with --trust-server to budget only "
                f"against the released models; ledger {self.path})")
        if self.budget_epsilon is not None and after > self.budget_epsilon:
            raise BudgetExceeded(
                f"privacy budget ε = {self.budget_epsilon:g} (δ = {self.budget_delta:g}) would "
                f"be exceeded: {len(self.entries)} earlier run(s) on this site's data spent "
                f"ε = {before:.4g}, and run {run_id} (agreement {agreement_id}, ε = "
                f"{alone:.4g} alone) would bring the composed total to {after:.4g}; "
                f"refused before training (ledger {self.path})")
        entry = {"run_id": str(run_id), "agreement_id": agreement_id,
                 "noise_multiplier": spend.noise_multiplier, "sample_rate": spend.sample_rate,
                 "steps": spend.steps, "delta": spend.delta, "epsilon": alone,
                 "unit": spend.unit, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if spend.pure_rounds:
            entry.update(epsilon_per_round=spend.epsilon_per_round,
                         pure_rounds=spend.pure_rounds)
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self.entries.append(entry)
        return after

    def report(self) -> str:
        """The ledger as a table, with the composed total and the budget."""
        lines = [f"ledger {self.path}: {len(self.entries)} run(s)",
                 f"{'run id':>22} {'agreement':>12} {'σ':>8} {'q':>8} {'steps':>6} "
                 f"{'run δ':>9} {'ε alone':>8}  protects"]
        for e in self.entries:
            sp = _spend(e)
            gauss = (f"{sp.noise_multiplier:>8.4g} {sp.sample_rate:>8.4g} {sp.steps:>6}"
                     if sp.steps else f"{'pure ε':>8} {sp.epsilon_per_round:>8.4g} "
                                      f"×{sp.pure_rounds:>5}")
            lines.append(f"{e['run_id']:>22} {e['agreement_id']:>12} {gauss} "
                         f"{e['delta']:>9.3g} {e['epsilon']:>8.4g}  "
                         f"{UNIT_NOTES.get(e.get('unit', ''), e.get('unit', ''))}")
        budget = "none set" if self.budget_epsilon is None else f"ε = {self.budget_epsilon:g}"
        lines.append(f"(ε alone and composed: {self.accountant} at the ledger's δ = "
                     f"{self.budget_delta:g} for the Gaussian runs, plus the pure-ε runs' ε "
                     "per round × rounds, basic composition; pure-ε rows show ε per round "
                     "× rounds in place of σ, q, steps)")
        raw = self.server_saw_raw_updates()
        against = ("against everyone outside the site" if not raw else
                   "against those who see the released models only")
        lines.append(f"composed: ε = {self.spent():.4g} at δ = {self.budget_delta:g} "
                     f"({self.accountant}), {against}; budget {budget}")
        if raw:
            lines.append(f"against the server: ε = ∞ (it saw this site's raw updates in run(s) "
                         f"{', '.join(raw)}: site-level DP)")
        return "\n".join(lines)


def _spend(entry: dict) -> Spend:
    """A ledger line as the :class:`Spend` it recorded (lines before pure-ε spends existed
    have no ``pure_rounds``: Gaussian)."""
    return Spend(entry["noise_multiplier"], entry["sample_rate"], entry["steps"],
                 entry["delta"], entry.get("unit", "subject"),
                 entry.get("epsilon_per_round", 0.0), entry.get("pure_rounds", 0))
