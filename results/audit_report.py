"""The audit reproduction's report: claimed vs audited ε per setting, and how close they are.

``privseg reproduce audit --quick`` prints :func:`audit_table` and :func:`audit_verdict` for
the audit records of its sweep. Audits draw secret canary coins and (without
``privacy.noise_seed``) secret DP noise, so a rerun's audited ε differs from any earlier one;
what must hold on every rerun is the invariant (design invariant 10): a correct mechanism's
lower bound never exceeds its claimed ε, and a deliberately broken one claiming ε ≤ 1 (the
issue's test case) is caught. The report checks exactly that instead of comparing numbers with
a committed file. It also shows each audit's ceiling, the bound r correct guesses out of r
would give: with m = 1000 canaries no audit can certify more than about 4, whatever it claims.
"""

from __future__ import annotations

import math

import pandas as pd

from privseg.dp.audit import epsilon_lower_bound

#: a deliberately broken run claiming at most this ε must be caught (bound above the claim);
#: above it the bound may hit the ceiling r correct guesses allow, below the claim
BROKEN_CAUGHT_UP_TO = 1.0

COLUMNS = {"setting": "setting", "model": "model", "epsilon": "target ε",
           "privacy.epsilon": "claimed ε", "audit.kind": "kind", "audit.fault": "fault",
           "audit.canaries_m": "m", "audit.guesses_r": "r", "audit.correct_v": "v",
           "audit.epsilon_lower": "audited ε ≥"}


def audit_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The audit records of ``df`` (rows with an ``audit.epsilon_lower``)."""
    if "audit.epsilon_lower" not in df:
        return df.iloc[0:0]
    return df[df["audit.epsilon_lower"].notna()]


def audit_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per audit: setting, model, target and claimed ε, canary kind, fault, m, r, v,
    the audited lower bound and whether it stays at or below the claim."""
    rows = audit_rows(df)
    cols = [c for c in COLUMNS if c in rows]
    rows = rows.sort_values(["setting", "model", "audit.kind", "audit.fault", "epsilon"],
                            ascending=[True, True, True, True, False], kind="stable")
    out = rows[cols].rename(columns=COLUMNS).copy()
    out["claimed ε"] = out["claimed ε"].map(lambda e: f"{e:.3f}")
    out["audited ε ≥"] = out["audited ε ≥"].map(lambda e: "inf" if math.isinf(e) else f"{e:.3f}")
    below = rows["audit.epsilon_lower"] <= rows["privacy.epsilon"]
    out["bound ≤ claim"] = below.map({True: "yes", False: "NO"})
    out["ceiling"] = [f"{_ceiling(r):.2f}" for _, r in rows.iterrows()]
    return out.reset_index(drop=True)


def _ceiling(row: pd.Series) -> float:
    """The bound all ``r`` guesses right would give: the most this audit can certify."""
    r = int(row["audit.guesses_r"])
    return epsilon_lower_bound(r, r, float(row["privacy.delta"]),
                               m=int(row["audit.canaries_m"]))


def audit_verdict(df: pd.DataFrame) -> tuple[str, bool]:
    """How close audited and claimed ε are, in words, and whether the invariant held: every
    correct run's bound ≤ its claim, every deliberately broken run's bound above it."""
    rows = audit_rows(df)
    if rows.empty:
        return "no audit records", False
    broken = rows["audit.broken"].fillna(False).astype(bool)
    above = rows["audit.epsilon_lower"] > rows["privacy.epsilon"]
    ok_rows, bad_rows = rows[~broken], rows[broken]
    lines = []
    for kind, g in ok_rows.groupby("audit.kind"):
        ratio = g["audit.epsilon_lower"] / g["privacy.epsilon"]
        lines.append(f"{kind} canaries, correct mechanism: {int((~above[g.index]).sum())} of "
                     f"{len(g)} bounds ≤ the claim; audited/claimed ε from {ratio.min():.2f} "
                     f"to {ratio.max():.2f} (median {ratio.median():.2f})")
    must = bad_rows[bad_rows["privacy.epsilon"] <= BROKEN_CAUGHT_UP_TO + 1e-9]
    if len(bad_rows):
        lines.append(f"deliberately broken mechanism: {int(above[bad_rows.index].sum())} of "
                     f"{len(bad_rows)} bounds above the claim (audited ε "
                     f"{bad_rows['audit.epsilon_lower'].min():.2f}–"
                     f"{bad_rows['audit.epsilon_lower'].max():.2f}); caught at claimed ε ≤ "
                     f"{BROKEN_CAUGHT_UP_TO:g}: {int(above[must.index].sum())} of {len(must)} "
                     "(larger claims lie near or above the ceiling r correct guesses allow)")
    lines.append("audits draw secret coins and secret DP noise: a rerun's audited ε differs "
                 "from any earlier one, so no committed numbers are compared; what must hold "
                 "on every rerun: bound ≤ claim for a correct mechanism, and a broken one "
                 f"claiming ε ≤ {BROKEN_CAUGHT_UP_TO:g} caught")
    ok = bool((~above[ok_rows.index]).all() and above[must.index].all())
    return "\n".join(lines), ok
