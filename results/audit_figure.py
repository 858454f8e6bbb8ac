"""Claimed vs audited ε: the accountant's upper bound against the one-run empirical lower bound.

Drawn from ``privseg audit`` records (rows with ``audit.epsilon_lower``): one panel per canary
kind (gradient: white-box; input: black-box), one marker per architecture, the diagonal where
the audited bound would meet the claim (a correct mechanism stays on or below it, invariant 10
of the design), deliberately broken runs in red.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def claimed_vs_audited(df: pd.DataFrame) -> Figure | None:
    """Audited lower bound (y) vs claimed ε (x) per canary kind; None without audit rows."""
    if "audit.epsilon_lower" not in df:
        return None
    rows = df[df["audit.epsilon_lower"].notna()]
    if rows.empty:
        return None
    kinds = sorted(rows["audit.kind"].dropna().unique())
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    top = max(1.0, float(rows["privacy.epsilon"].max()), float(
        rows["audit.epsilon_lower"].replace(math.inf, float("nan")).max()))
    for ax, kind in zip(axes[0], kinds, strict=True):
        sub = rows[rows["audit.kind"] == kind]
        broken = sub["audit.broken"].fillna(False).astype(bool)
        for model, g in sub[~broken].groupby("model"):
            ax.plot(g["privacy.epsilon"], g["audit.epsilon_lower"], "o", label=model, alpha=0.8)
        if broken.any():
            ax.plot(sub[broken]["privacy.epsilon"], sub[broken]["audit.epsilon_lower"], "x",
                    color="red", markersize=9, label="broken mechanism")
        ax.plot([0, top], [0, top], "k--", lw=1, label="audited = claimed")
        ax.set_xlim(0, top * 1.05)
        ax.set_ylim(0, top * 1.05)
        ax.set_xlabel("claimed ε (accountant, per subject)")
        ax.set_ylabel("audited ε lower bound (95%)")
        m = sub["audit.canaries_m"].dropna()
        ax.set_title(f"{kind} canaries" + (f" (m = {int(m.iloc[0])})" if len(m) else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
