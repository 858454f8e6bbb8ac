"""Selective parameter sharing (Li et al. 2019): Dice vs fraction shared × privacy setting.

Li et al. 2019 ("Privacy-preserving federated brain tumour segmentation", MLMI, arXiv
1910.00962) let each site share a fraction of its update, chosen with the sparse vector
technique (SVT) and released with Laplace noise. ``privseg reproduce li2019`` reruns their
trade-off; this module turns the runs into its table and figure:

- *no DP*: FedAvg at fraction 1, top-k partial sharing below it (ε = ∞);
- *SVT* (``dp_mode: svt``): pure ε-DP, δ = 0, the unit one site's whole update (local DP: the
  server need not be trusted); ε per site over all rounds (basic composition) and per round;
- *DP-FedAvg* (``dp_mode: site``) at the same ε, full sharing: (ε, δ)-DP for one site's data
  present or absent, the server trusted with raw updates (central DP).

The two DP series are not the same guarantee; the figure's legend and the table say which
is which. Bytes are the serialised parameter payload a site sends per round (Flower
``Parameters`` tensors, without gRPC framing), against the dense model's.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from privseg.results.tables import (  # noqa: E402
    METRIC,
    aggregate,
    eps_label,
    fmt_cell,
    seeds_text,
)

FRACTION = "config.setting.federated.share_fraction"
#: the series of the table and figure, in order
SERIES = ("no DP", "SVT", "DP-FedAvg")
SVT_UNIT = "SVT: pure ε-DP (δ = 0), unit one site's whole update (local DP, untrusted server)"


def _series(row: pd.Series) -> str | None:
    if not row.get("private"):
        return "no DP"
    return {"svt": "SVT", "site": "DP-FedAvg"}.get(row.get("privacy.mode"))


def sharing_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The federated runs of a selective-sharing study, with ``series`` (no DP / SVT /
    DP-FedAvg) and ``fraction`` (the share of each update sent) columns; empty when ``df``
    holds no share fraction."""
    if df.empty or FRACTION not in df:
        return pd.DataFrame()
    d = df[df["config.setting.kind"] == "federated"].copy() if (
        "config.setting.kind" in df) else df.copy()
    d["series"] = [_series(r) for _, r in d.iterrows()]
    d["fraction"] = pd.to_numeric(d[FRACTION], errors="coerce")
    return d.dropna(subset=["series", "fraction"])


def _delta(d: pd.DataFrame) -> str:
    x = pd.to_numeric(d.get("privacy.delta", pd.Series(dtype=float)), errors="coerce").dropna()
    return f"{x.max():.2g}" if len(x) else "?"


def sharing_table(df: pd.DataFrame, metric: str = METRIC, digits: int = 3) -> pd.DataFrame:
    """One row per ε (no DP first): the series (no DP: top-k sharing; else SVT), SVT's ε per
    round, test Dice at each fraction shared (largest first), and FedAvg / DP-FedAvg at the
    same ε (full sharing) with DP-FedAvg's δ."""
    d = sharing_frame(df)
    if d.empty:
        return pd.DataFrame()
    agg = aggregate(d, [metric], ["series", "fraction"])
    fractions = sorted(agg["fraction"].unique(), reverse=True)
    per_round = (d.groupby("epsilon")["privacy.epsilon_per_round"].max()
                 if "privacy.epsilon_per_round" in d else pd.Series(dtype=float))
    rows = []
    for eps in sorted(agg["epsilon"].unique(), key=lambda e: -float(e)):
        a = agg[agg["epsilon"] == eps]
        nodp = math.isinf(eps)
        row = {"sharing": "no DP (top-k)" if nodp else "SVT (local DP, δ = 0)",
               "ε per site, all rounds": "∞" if nodp else f"{eps:g}",
               "SVT ε per round": "–" if nodp or eps not in per_round else
               f"{per_round[eps]:g}"}
        for f in fractions:
            row[f"Dice @ shared {f:g}"] = _fmt(
                a[(a["series"] == ("no DP" if nodp else "SVT")) & (a["fraction"] == f)],
                metric, digits)
        full = a[(a["series"] == ("no DP" if nodp else "DP-FedAvg")) & (a["fraction"] == 1.0)]
        row["FedAvg / DP-FedAvg (full sharing)"] = _fmt(full, metric, digits)
        row["DP-FedAvg δ"] = "–" if nodp else _delta(
            d[(d["series"] == "DP-FedAvg") & (d["epsilon"] == eps)])
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(r: pd.DataFrame, metric: str, digits: int) -> str:
    if r.empty:
        return "–"
    x = r.iloc[0]
    return fmt_cell(x[f"{metric}.mean"], x[f"{metric}.std"], x[f"{metric}.n"], digits)


def bytes_table(df: pd.DataFrame) -> pd.DataFrame:
    """Bytes a site sent per round (mean over rounds and runs) vs full sharing, per series, ε
    and fraction: what sharing less saves on the wire (SVT sends at most c coordinates, as
    uint32 index + value each, so its bytes depend on ε)."""
    d = sharing_frame(df)
    if d.empty or "federated.bytes_up_per_site" not in d:
        return pd.DataFrame()
    rows = []
    for (series, eps, f), g in d.groupby(["series", "epsilon", "fraction"], sort=False):
        up = float(g["federated.bytes_up_per_site"].mean())
        dense = float(g["federated.dense_bytes_up_per_site"].mean())
        rows.append({"series": series, "ε": eps, "fraction": f, "runs": len(g),
                     "bytes up per site per round": f"{up:,.0f}",
                     "full sharing": f"{dense:,.0f}", "ratio": f"{up / dense:.3f}"})
    out = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(SERIES)}
    out = out.sort_values(["series", "ε", "fraction"], key=lambda c: c.map(order) if
                          c.name == "series" else -c).reset_index(drop=True)
    out["ε"] = [eps_label(e) for e in out["ε"]]
    return out


def dice_vs_fraction(df: pd.DataFrame, metric: str = METRIC) -> Figure | None:
    """x = fraction of each site's update shared per round (log, all at the left); one line
    for no DP (top-k sharing, fraction 1 = FedAvg) and one per SVT ε; DP-FedAvg at the same
    ε as a triangle at fraction 1 in that ε's colour. δ and the privacy unit in the legend."""
    d = sharing_frame(df)
    if d.empty or d["fraction"].nunique() < 2:
        return None
    agg = aggregate(d, [metric], ["series", "fraction"])
    fig, ax = plt.subplots(figsize=(7.2, 4.6), layout="constrained")
    rounds = (int(d["config.setting.federated.rounds"].max())
              if "config.setting.federated.rounds" in d else None)
    svt_eps = sorted(agg.loc[agg["series"] == "SVT", "epsilon"].unique(), reverse=True)
    site_eps = set(agg.loc[agg["series"] == "DP-FedAvg", "epsilon"])
    colours = dict(zip(svt_eps, plt.cm.viridis(np.linspace(0.1, 0.85, max(len(svt_eps), 1))),
                       strict=False))
    for series, eps_list in (("no DP", [math.inf]), ("SVT", svt_eps)):
        for eps in eps_list:
            g = agg[(agg["series"] == series) & (agg["epsilon"] == eps)].sort_values("fraction")
            if g.empty:
                continue
            if series == "no DP":
                label, colour = "no DP (ε = ∞): top-k sharing, 1 = FedAvg", "black"
            else:
                per_round = f", {eps / rounds:g} per round" if rounds else ""
                label, colour = f"SVT, ε = {eps:g}{per_round}, δ = 0", colours[eps]
            ax.errorbar(g["fraction"], g[f"{metric}.mean"], yerr=_err(g, metric),
                        marker="o", capsize=3, color=colour, label=label)
    for eps in sorted(site_eps, reverse=True):
        g = agg[(agg["series"] == "DP-FedAvg") & (agg["epsilon"] == eps)]
        delta = _delta(d[(d["series"] == "DP-FedAvg") & (d["epsilon"] == eps)])
        ax.errorbar(g["fraction"], g[f"{metric}.mean"], yerr=_err(g, metric),
                    marker="^", markersize=9, linestyle="none", capsize=3,
                    color=colours.get(eps, "grey"), markeredgecolor="black",
                    label=f"DP-FedAvg, ε = {eps:g}, δ = {delta} (full sharing)")
    fractions = sorted(agg["fraction"].unique())
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:g}" + ("\n(all)" if f == 1 else "") for f in fractions])
    ax.minorticks_off()
    ax.invert_xaxis()  # full sharing at the left, sharing less to the right
    ax.set_xlabel("fraction of each site's update shared per round (log scale)")
    ax.set_ylabel("Test Dice, mean over classes (0–1)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    name = d["dataset"].iloc[0] if "dataset" in d and d["dataset"].nunique() == 1 else None
    ax.set_title("Selective parameter sharing (Li et al. 2019)" + (f", {name}" if name else ""))
    ax.legend(title="privacy: ε per site over all rounds", fontsize="x-small",
              title_fontsize="small")
    fig.supxlabel(f"{SVT_UNIT};\nDP-FedAvg: (ε, δ)-DP, unit one site's data present or absent "
                  f"(central DP, trusted server); {seeds_text(agg['n_seeds'])}",
                  fontsize="xx-small", color="grey")
    return fig


def _err(g: pd.DataFrame, metric: str):
    """Error bars only where there is a spread over seeds (NaN std: none)."""
    std = g[f"{metric}.std"]
    return None if std.isna().all() else std


#: rows of :func:`published_table`: the published key and what in privseg's runs matches it
PUBLISHED_ROWS = (("central", "central, non-private"), ("fedavg", "FedAvg (no DP, full sharing)"),
                  ("fedavg+svt", "FedAvg + SVT (privseg: each ε and fraction shared)"))


def published_table(df: pd.DataFrame, published: dict, metric: str = METRIC) -> pd.DataFrame:
    """Published mean Dice (e.g. NVFlare's BraTS 2018 example) beside this rerun's: central
    (privseg's central non-private runs, if any), FedAvg (no DP at fraction 1), and FedAvg +
    SVT (every SVT cell, each named by its ε and fraction: the published run's own ε is not
    comparable, its accounting being the one privseg replaces)."""
    d = sharing_frame(df)
    agg = aggregate(d, [metric], ["series", "fraction"]) if not d.empty else d
    central = df[(df.get("setting") == "central") & ~df["private"].astype(bool)] if (
        "setting" in df and "private" in df) else df.iloc[0:0]
    ours = {"central": f"{central[metric].mean():.3f}" if len(central) else "–"}
    if not agg.empty:
        full = agg[(agg["series"] == "no DP") & (agg["fraction"] == 1.0)]
        ours["fedavg"] = _fmt(full, metric, 3)
        svt = agg[agg["series"] == "SVT"].sort_values(["epsilon", "fraction"],
                                                       ascending=False)
        ours["fedavg+svt"] = "; ".join(
            f"{r[f'{metric}.mean']:.3f} (ε {r['epsilon']:g}, shared {r['fraction']:g})"
            for _, r in svt.iterrows()) or "–"
    return pd.DataFrame([{"run": label, "published": published.get(key, "–"),
                          "privseg (this rerun)": ours.get(key, "–")}
                         for key, label in PUBLISHED_ROWS])
