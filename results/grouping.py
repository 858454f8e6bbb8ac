"""Which runs may share a table cell or a plotted point: those equal in all but the seed.

A cell's mean ± std is a spread over seeds. Runs whose configs differ in anything else that
determines the result (epochs, learning rate, data options …) are a different experiment: they
are split into their own rows (a ``variant`` column naming the differing keys and values),
never averaged into one cell.
"""

from __future__ import annotations

import math

import pandas as pd

#: config columns that may differ inside one cell: the seed, and what names, tracks or places a
#: run rather than determining its result.
POOLABLE = ("config.seed", "config.name", "config.tracking.", "config.output.",
            "config.dataset.cache_dir", "config.privacy.noise_seed")
VARIANT = "variant"


def _result_columns(df: pd.DataFrame, private: bool) -> list[str]:
    cols = [c for c in df.columns if c.startswith("config.") and not c.startswith(POOLABLE)]
    if not private:  # a non-private run ignores every privacy knob but the switch itself
        cols = [c for c in cols if not c.startswith("config.privacy.")
                or c == "config.privacy.enabled"]
    return cols


def _is_private(eps) -> bool:
    try:
        return not math.isinf(float(eps))
    except (TypeError, ValueError):
        return True


def differing_keys(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Config columns (besides the seed and bookkeeping) that differ between runs of one
    ``keys`` + ε group: the reason those runs must not be pooled."""
    if df.empty:
        return []
    group_by = list(dict.fromkeys([*keys, "epsilon"]))
    found: list[str] = []
    for vals, g in df.groupby(group_by, dropna=False, sort=False):
        if len(g) < 2:
            continue
        eps = vals[group_by.index("epsilon")] if isinstance(vals, tuple) else vals
        for c in _result_columns(g, _is_private(eps)):
            if c not in found and g[c].astype(str).nunique() > 1:
                found.append(c)
    return found


def split_variants(df: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with a ``variant`` column (``training.epochs=2, training.lr=0.01``) and ``keys``
    extended by it when runs of one group differ in more than the seed; else both unchanged."""
    if VARIANT in df or VARIANT in keys:
        return df, list(dict.fromkeys([*keys, VARIANT])) if VARIANT in df else keys
    cols = differing_keys(df, keys)
    if not cols:
        return df, keys
    labels = []
    for _, row in df.iterrows():
        own = [c for c in cols if _is_private(row.get("epsilon")) or c in
               _result_columns(df[[c]], False)]
        labels.append(", ".join(f"{c.removeprefix('config.')}={row[c]}" for c in own))
    return df.assign(**{VARIANT: labels}), [*keys, VARIANT]
