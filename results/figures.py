"""Paper figures from the results DataFrame: each drawn only when the data has what it needs.

- Dice vs ε per architecture (ε = ∞ drawn as 'non-private', apart from the finite ε)
- Dice vs model width at fixed ε
- central vs federated per architecture and ε
- per-site Dice per architecture (at the most private ε and non-private)
- claimed vs audited ε (``privseg audit`` records; :mod:`privseg.results.audit_figure`)
- Dice vs fraction shared per privacy setting (Li et al. 2019; :mod:`privseg.results.sharing`)

Every function returns a matplotlib Figure (or None when the data cannot support it);
:func:`make_figures` saves each as PNG and PDF.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from privseg.results.audit_figure import claimed_vs_audited  # noqa: E402
from privseg.results.grouping import VARIANT, split_variants  # noqa: E402
from privseg.results.sharing import dice_vs_fraction  # noqa: E402
from privseg.results.tables import (  # noqa: E402
    METRIC,
    aggregate,
    delta_text,
    eps_label,
    seeds_text,
    unit_text,
)

DICE_LABEL = "Test Dice, mean over classes (0–1)"


def _title_suffix(df: pd.DataFrame) -> str:
    parts = []
    if "dataset" in df and df["dataset"].nunique() == 1:
        parts.append(str(df["dataset"].iloc[0]))
    if "config.dataset.dims" in df and df["config.dataset.dims"].nunique() == 1:
        parts.append(f"{int(df['config.dataset.dims'].iloc[0])}D")
    if "setting" in df and df["setting"].nunique() == 1:
        parts.append(str(df["setting"].iloc[0]))
    return f" ({', '.join(parts)})" if parts else ""


def _seeds_note(agg: pd.DataFrame) -> str:
    """What a point or bar is (and what its error bar is, if it has one)."""
    note = seeds_text(agg["n_seeds"]).replace("per cell", "per point").replace(
        "a one-seed cell", "a one-seed point").replace("(seeds column; ", "(")
    return note.replace("no ±", "no error bar")


def _yerr(std) -> np.ndarray | None:
    """Error bars only where there is a spread (≥ 2 seeds): NaN draws none, never a 0 bar."""
    arr = np.asarray(std, dtype=float)
    return None if np.isnan(arr).all() else arr


def _eps_positions(eps: list[float]) -> dict[float, float]:
    finite = sorted(e for e in eps if math.isfinite(e))
    pos = {e: math.log10(e) for e in finite}
    if any(math.isinf(e) for e in eps):
        if finite:
            span = math.log10(finite[-1]) - math.log10(finite[0]) if len(finite) > 1 else 1.0
            pos[math.inf] = math.log10(finite[-1]) + max(0.35 * span, 0.3)
        else:
            pos[math.inf] = 0.0
    return pos


def _finish(ax, agg: pd.DataFrame, title: str, legend_title: str,
            extra_handles: list | None = None) -> None:
    """Dice axis from 0, title, grid, legend (with ``extra_handles``, e.g. what a marker
    shape means) and the seeds-per-point note."""
    ax.set_ylabel(DICE_LABEL)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    for h in extra_handles or []:
        handles.append(h)
        labels.append(h.get_label())
    ax.legend(handles, labels, title=legend_title, fontsize="small")
    ax.text(0.01, 0.01, _seeds_note(agg), transform=ax.transAxes, fontsize="x-small",
            color="grey", va="bottom")


def epsilon_axis_label(df: pd.DataFrame) -> str:
    """What ε counts (per subject, or per whole site for site-level federated DP) and at
    which δ."""
    dt = delta_text(df)
    return f"privacy budget {unit_text(df)}" + (f", {dt}" if dt else "")


def dice_vs_epsilon(df: pd.DataFrame, metric: str = METRIC) -> Figure | None:
    """Utility vs privacy: one line per architecture, x = ε (log), non-private at the right."""
    if df.empty or df["epsilon"].nunique() < 2:
        return None
    df, keys = split_variants(df, ["model"] + (["setting"] if df["setting"].nunique() > 1
                                               else []))
    agg = aggregate(df, [metric], keys)
    pos = _eps_positions(list(agg["epsilon"].unique()))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for vals, g in agg.groupby(keys, sort=True):
        vals = vals if isinstance(vals, tuple) else (vals,)
        g = g.sort_values("epsilon")
        x = [pos[e] for e in g["epsilon"]]
        finite = np.isfinite(g["epsilon"].to_numpy(dtype=float))
        label = " / ".join(str(v) for v in vals)
        line = ax.errorbar(np.array(x)[finite], g[f"{metric}.mean"].to_numpy()[finite],
                           yerr=_yerr(g[f"{metric}.std"].to_numpy()[finite]),
                           marker="o", capsize=3, label=label)
        if (~finite).any():
            ax.errorbar(np.array(x)[~finite], g[f"{metric}.mean"].to_numpy()[~finite],
                        yerr=_yerr(g[f"{metric}.std"].to_numpy()[~finite]),
                        marker="s", capsize=3, color=line[0].get_color(), linestyle="none")
    if math.inf in pos and len(pos) > 1:
        finite_max = max(v for e, v in pos.items() if math.isfinite(e))
        ax.axvline((finite_max + pos[math.inf]) / 2, color="grey", linestyle=":", linewidth=1)
    ticks = sorted(pos.items(), key=lambda kv: kv[1])
    ax.set_xticks([p for _, p in ticks])
    ax.set_xticklabels(["non-private\n(ε = ∞)" if math.isinf(e) else f"{e:g}" for e, _ in ticks])
    ax.set_xlabel(f"{epsilon_axis_label(df)} (log scale; smaller = more private)")
    from matplotlib.lines import Line2D

    shapes = [Line2D([], [], marker="o", color="grey", linestyle="-",
                     label="● DP-SGD at the target ε")]
    if math.inf in pos:
        shapes.append(Line2D([], [], marker="s", color="grey", linestyle="none",
                             label="■ non-private (ε = ∞)"))
    _finish(ax, agg, f"Segmentation quality vs privacy budget{_title_suffix(df)}",
            "architecture", shapes)
    return fig


def dice_vs_width(df: pd.DataFrame, metric: str = METRIC) -> Figure | None:
    """Width scaling: x = width multiplier (log2), one line per ε (and model family)."""
    if df.empty or "width" not in df or df["width"].nunique(dropna=True) < 2:
        return None
    d = df.dropna(subset=["width"]).copy()
    d["family"] = d["model"].str.replace(r"-(narrow|wide|xwide)$", "", regex=True)
    d, keys = split_variants(d, ["family", "width"])
    agg = aggregate(d, [metric], keys)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    families = sorted(agg["family"].unique())
    lines = ["family", "epsilon"] + ([VARIANT] if VARIANT in agg else [])
    for vals, g in agg.groupby(lines, sort=False):
        fam, eps = vals[0], vals[1]
        g = g.sort_values("width")
        label = eps_label(eps) + (f" ({fam})" if len(families) > 1 else "") + (
            f" [{vals[2]}]" if len(vals) > 2 else "")
        ax.errorbar(g["width"], g[f"{metric}.mean"], yerr=_yerr(g[f"{metric}.std"]),
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    widths = sorted(agg["width"].unique())
    ax.set_xticks(widths)
    ax.set_xticklabels([f"{w:g}×" for w in widths])
    ax.set_xlabel("model width (channel multiplier, log scale)")
    if delta_text(d):
        ax.text(0.99, 0.01, f"{unit_text(d)}, {delta_text(d)}", transform=ax.transAxes,
                fontsize="x-small", color="grey", va="bottom", ha="right")
    fam = families[0] if len(families) == 1 else "models"
    _finish(ax, agg, f"Width scaling of {fam}{_title_suffix(df)}", "privacy")
    return fig


def _grouped_bars(ax, agg: pd.DataFrame, group: str, hue: str, metric: str,
                  hue_label=str, group_label=str) -> None:
    groups = list(dict.fromkeys(agg[group]))
    hues = list(dict.fromkeys(agg[hue]))
    width = 0.8 / max(len(hues), 1)
    for i, h in enumerate(hues):
        g = agg[agg[hue] == h].set_index(group)
        means = [g[f"{metric}.mean"].get(x, np.nan) for x in groups]
        stds = [g[f"{metric}.std"].get(x, np.nan) for x in groups]
        ax.bar(np.arange(len(groups)) + (i - (len(hues) - 1) / 2) * width, means, width,
               yerr=_yerr(stds), capsize=3, label=hue_label(h))
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([group_label(x) for x in groups])


def _eps_sorted(values) -> list[float]:
    return sorted(set(float(v) for v in values), key=lambda e: -e)


def _panels(agg: pd.DataFrame, hue: str, metric: str, ylabel: str, title: str,
            legend_title: str, xlabel: str) -> Figure:
    """One panel per architecture (and variant); x = ε (non-private first); one bar per
    ``hue`` value; the seeds behind each bar noted under the panels."""
    if VARIANT in agg:
        agg = agg.assign(model=agg["model"] + "\n" + agg[VARIANT].astype(str))
    models = sorted(agg["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.4, 3.6 * len(models)), 4.2),
                             sharey=True, layout="constrained", squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        a = agg[agg["model"] == model].copy()
        order = _eps_sorted(a["epsilon"])
        a["where"] = pd.Categorical(a["epsilon"].astype(float), categories=order, ordered=True)
        a = a.sort_values(["where", hue])
        _grouped_bars(ax, a, "where", hue, metric, group_label=eps_label)
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(title=legend_title, fontsize="small")
    fig.suptitle(title)
    fig.supxlabel(_seeds_note(agg), fontsize="x-small", color="grey")
    return fig


def central_vs_federated(df: pd.DataFrame, metric: str = METRIC) -> Figure | None:
    """Bars per architecture panel: x = ε, one bar per setting."""
    if df.empty or df["setting"].nunique() < 2:
        return None
    df, keys = split_variants(df, ["model", "setting"])
    agg = aggregate(df, [metric], keys)
    return _panels(agg, "setting", metric, DICE_LABEL,
                   f"Central vs federated training{_title_suffix(df)}", "setting",
                   epsilon_axis_label(df))


def per_site(df: pd.DataFrame) -> Figure | None:
    """Bars per architecture panel: x = ε, one bar per site (test subjects of that site)."""
    site_cols = sorted(c for c in df.columns if c.startswith("test.site.") and
                       c.endswith(".mean_dice"))
    if df.empty or len(site_cols) < 2:
        return None
    df, keys = split_variants(df, ["model", "setting"])
    ids = ["model", "epsilon", "seed", "setting"] + ([VARIANT] if VARIANT in keys else [])
    long = df.melt(id_vars=ids, value_vars=site_cols,
                   var_name="site", value_name="site_dice").dropna(subset=["site_dice"])
    long["site"] = long["site"].str.slice(len("test.site."), -len(".mean_dice"))
    if long["setting"].nunique() > 1:  # one panel per architecture and setting, never mixed
        long["model"] = long["model"] + " / " + long["setting"]
    agg = aggregate(long, ["site_dice"], ["model", "site"] + ids[4:])
    return _panels(agg, "site", "site_dice", "Test Dice on the site's subjects (0–1)",
                   f"Per-site test Dice{_title_suffix(df)}", "site", epsilon_axis_label(df))


FIGURES = {
    "dice_vs_epsilon": dice_vs_epsilon,
    "dice_vs_width": dice_vs_width,
    "central_vs_federated": central_vs_federated,
    "per_site_dice": per_site,
    "claimed_vs_audited_epsilon": claimed_vs_audited,
    "dice_vs_fraction_shared": dice_vs_fraction,
}


def make_figures(df: pd.DataFrame, out_dir: str | Path, prefix: str = "",
                 formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Draw every figure the data supports; save each as PNG and PDF; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in FIGURES.items():
        fig = fn(df)
        if fig is None:
            continue
        for ext in formats:
            p = out / f"{prefix}{name}.{ext}"
            fig.savefig(p, dpi=150)
            paths.append(p)
        plt.close(fig)
    return paths
