"""Paper tables: mean ± std over seeds per architecture × ε (and per class).

A cell pools only runs equal in all but the seed (:mod:`privseg.results.grouping`); a cell
of one run shows its value and no ±; the caption says how many seeds each cell has.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from privseg.results.grouping import VARIANT, split_variants

METRIC = "test.mean_dice"


def eps_label(eps: float) -> str:
    """Column/legend label of a target ε; ∞ is 'non-private'."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return "ε = ?"
    return "non-private" if math.isinf(eps) else f"ε = {eps:g}"


#: audit rows are kept apart by canary kind, number of canaries and deliberate fault: a lower
#: bound from input canaries, or from a broken mechanism, is not a seed of a gradient audit
AUDIT_KEYS = ("audit.kind", "audit.canaries_m", "audit.fault")


def group_keys(df: pd.DataFrame) -> list[str]:
    """Row keys: architecture, plus setting / dataset / width when they vary, plus the canary
    kind, m and fault when audits are present."""
    keys = []
    for k in ("dataset", "setting"):
        if k in df and df[k].nunique(dropna=True) > 1:
            keys.append(k)
    keys.append("model")
    if "width" in df and df.groupby("model")["width"].nunique(dropna=True).gt(1).any():
        keys.append("width")
    if "audit.kind" in df and df["audit.kind"].notna().any():
        keys += [k for k in AUDIT_KEYS if k in df]
    return keys


def class_columns(df: pd.DataFrame, metric: str = "dice", source: str = "test") -> list[str]:
    """The per-class columns of ``metric`` for ``source`` (``test``: the raw weights;
    ``released``: the EMA when kept, see :func:`privseg.results.store.released_metrics`)."""
    return [c for c in df.columns if c.startswith(f"{source}.{metric}.")]


def _per_class_metrics(df: pd.DataFrame, metric: str) -> list[str]:
    """A per-class table's columns: each class's Dice, the worst class (where the store has
    it: ``released.min_dice``), then ``metric``."""
    worst = f"{_source(metric)}.min_dice"
    return class_columns(df, source=_source(metric)) + ([worst] if worst in df else []) + [metric]


def _source(metric: str) -> str:
    """``released`` for a ``released.*`` metric (its classes are the released weights'), else
    ``test``."""
    return "released" if metric.startswith("released.") else "test"


def aggregate(df: pd.DataFrame, metrics: list[str] | None = None,
              keys: list[str] | None = None) -> pd.DataFrame:
    """Long table: one row per group × ε with ``<metric>.mean``, ``.std`` (ddof 1), ``.n``,
    ``n_seeds``, ``n_runs`` and (when known) ``n_empty_pred``, the test volumes where a present
    class was never predicted.

    Runs that differ in more than the seed get their own rows (a ``variant`` column names the
    differing config keys): a cell is a spread over seeds, never over other settings.
    """
    metrics = metrics or [METRIC]
    df, keys = split_variants(df, list(keys or group_keys(df)))
    keys = keys + ["epsilon"]
    rows = []
    for vals, g in df.groupby(keys, dropna=False, sort=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        row = dict(zip(keys, vals, strict=True))
        row["n_seeds"] = int(g["seed"].nunique()) if "seed" in g else len(g)
        row["n_runs"] = len(g)
        if "test.n_empty_pred" in g:
            row["n_empty_pred"] = int(pd.to_numeric(g["test.n_empty_pred"], errors="coerce")
                                      .fillna(0).sum())
        for m in metrics:
            x = pd.to_numeric(g[m], errors="coerce").dropna() if m in g else pd.Series([],
                                                                                      dtype=float)
            row[f"{m}.mean"] = float(x.mean()) if len(x) else np.nan
            row[f"{m}.std"] = float(x.std(ddof=1)) if len(x) > 1 else np.nan
            row[f"{m}.n"] = int(len(x))
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    # ε order: non-private first, then decreasing ε.
    out["_eps_order"] = -out["epsilon"].astype(float)
    out = out.sort_values(keys[:-1] + ["_eps_order"], kind="stable").drop(columns="_eps_order")
    return out.reset_index(drop=True)


def fmt_cell(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(df: pd.DataFrame, metric: str = METRIC, per_class: bool = False,
                  digits: int = 3) -> pd.DataFrame:
    """Wide table of strings.

    Default: rows = architecture (and setting/width when they vary), columns = ε (non-private
    first), cells = mean ± std of ``metric`` over seeds. ``per_class``: rows = architecture × ε,
    columns = the classes (Dice) and the mean.
    """
    if df.empty:
        return pd.DataFrame()
    df, keys = split_variants(df, group_keys(df))
    if per_class:
        metrics = _per_class_metrics(df, metric)
        agg = aggregate(df, metrics, keys)
        table = agg[keys].copy()
        table.insert(len(keys), "ε", [eps_label(e) for e in agg["epsilon"]])
        for m in metrics:
            name = "mean" if m == metric else m.split(".")[-1]
            table[name] = [fmt_cell(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.n"], digits)
                           for _, r in agg.iterrows()]
        table["seeds"] = agg["n_seeds"].values
        return table.reset_index(drop=True)
    agg = aggregate(df, [metric], keys)
    eps_order = sorted(agg["epsilon"].unique(), key=lambda e: -float(e))
    rows = []
    for vals, g in agg.groupby(keys, dropna=False, sort=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        row = dict(zip(keys, vals, strict=True))
        by_eps = {e: r for e, r in zip(g["epsilon"], g.to_dict("records"), strict=True)}
        for e in eps_order:
            r = by_eps.get(e)
            row[eps_label(e)] = "–" if r is None else fmt_cell(
                r[f"{metric}.mean"], r[f"{metric}.std"], r[f"{metric}.n"], digits
            ) + _empty_note(r, metric)
        row["seeds"] = int(g["n_seeds"].max())
        rows.append(row)
    return pd.DataFrame(rows)


def _empty_note(r: dict, metric: str) -> str:
    n = r.get("n_empty_pred")
    if "hd95" not in metric or not n or (isinstance(n, float) and math.isnan(n)):
        return ""
    return f" ({int(n)} empty)"


def delta_text(df: pd.DataFrame) -> str:
    """The δ behind the private runs' ε: ``δ = 0.001`` or a range; '' with no private run."""
    if "privacy.delta" not in df:
        return ""
    d = pd.to_numeric(df["privacy.delta"], errors="coerce").dropna()
    if d.empty:
        return ""
    lo, hi = float(d.min()), float(d.max())
    return f"δ = {lo:.2g}" if math.isclose(lo, hi) else f"δ = {lo:.2g}–{hi:.2g}"


def unit_text(df: pd.DataFrame) -> str:
    """What ε counts: per subject, or per whole site for site-level federated DP."""
    units = set(df["privacy.unit"].dropna()) if "privacy.unit" in df else set()
    if units == {"site"}:
        return "ε per site"
    if "site" in units:
        return "ε per subject (per site for site-level DP)"
    return "ε per subject"


def seeds_text(n_seeds) -> str:
    """What a cell is: ``mean ± std over 3 seeds``, ``one seed (no ±)``, or a mixed count."""
    n = sorted({int(x) for x in n_seeds})
    if not n:
        return "no runs"
    if n == [1]:
        return "one seed per cell (a single run: no ±)"
    if len(n) == 1:
        return f"mean ± std (ddof 1) over {n[0]} seeds"
    return (f"mean ± std (ddof 1) over {n[0]}–{n[-1]} seeds per cell "
            "(seeds column; a one-seed cell has no ±)")


def caption(df: pd.DataFrame, name: str, metric: str = METRIC) -> str:
    """A caption that states exactly what the table computed: the metric, the seeds per cell,
    the privacy unit and δ, the variants kept apart, and the HD95 convention."""
    agg = aggregate(df, [metric])
    what = metric.removeprefix("test.").replace("_", " ")
    parts = [f"{name}: test {what}, {seeds_text(agg['n_seeds'])}"]
    dt = delta_text(df)
    parts.append(f"{unit_text(df)} at {dt}" if dt else unit_text(df))
    if VARIANT in agg:
        parts.append("runs differing in more than the seed are separate rows (variant)")
    if "hd95" in metric:
        parts.append("HD95 in voxels; a class present but never predicted counts as the "
                     "volume diagonal; (k empty) = such test volumes")
    return "; ".join(parts)


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub markdown (written here: pandas' to_markdown needs the optional tabulate)."""
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i < 1 else "---:" for i in range(len(cols))) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in r.values) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "\\|")


_LATEX_ESC = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "ε": r"$\varepsilon$",
              "δ": r"$\delta$", "±": r"$\pm$", "–": "--", "∞": r"$\infty$"}


def _latex(s: str) -> str:
    for a, b in _LATEX_ESC.items():
        s = s.replace(a, b)
    return s


def to_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``)."""
    cols = [str(c) for c in table.columns]
    spec = "l" * 1 + "r" * (len(cols) - 1)
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_latex(caption)}}}")
    lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
              " & ".join(_latex(c) for c in cols) + r" \\", r"\midrule"]
    for _, r in table.iterrows():
        lines.append(" & ".join(_latex(_cell(v)) for v in r.values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def render(df: pd.DataFrame, fmt: str = "markdown", per_class: bool = False,
           metric: str = METRIC, caption: str | None = None) -> str:
    """The table of ``df`` as markdown, LaTeX, or CSV (CSV: the numbers, mean/std/n, long)."""
    if fmt == "csv":
        keys = group_keys(df)
        metrics = _per_class_metrics(df, metric) if per_class else [metric]
        return aggregate(df, metrics, keys).to_csv(index=False)
    table = summary_table(df, metric, per_class)
    if fmt == "markdown":
        return to_markdown(table)
    if fmt == "latex":
        return to_latex(table, caption)
    raise ValueError(f"unknown format {fmt!r}: markdown, latex or csv")
