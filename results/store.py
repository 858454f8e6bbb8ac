"""The run store: run records (or W&B runs) as one tidy pandas DataFrame, one row per run.

Columns:

- identity: ``run_id``, ``name``, ``sweep`` (``tracking.group``), ``status``
- study axes: ``dataset``, ``model``, ``width`` (the model's width multiplier, registry default
  filled in), ``setting``, ``seed``, ``epsilon`` (the target ε; ``inf`` for non-private runs;
  for a fixed-σ run the ε spent), ``private``
- released model (:func:`released_metrics`): ``released.mean_dice``, ``released.min_dice`` (its
  worst class), ``released.dice.<class>``, ``released.val_mean_dice`` (on the validation
  subjects, at the end: what a tuning sweep selects on), ``released.weights`` (``ema`` or
  ``raw``): the EMA
  weights when the run kept an EMA (``training.ema``, the weights such a recipe is run for),
  else the raw weights; ``ema.test.mean_dice`` the EMA's Dice alone (NaN without one)
- test metrics (raw weights): ``test.mean_dice``, ``test.dice.<class>``, ``test.mean_hd95``,
  ``test.hd95.<class>`` (a class present in a test volume but never predicted there counts
  with the worst-case distance, see :mod:`privseg.training.evaluate`), ``test.n_empty_pred``
  and ``test.empty_pred.<class>`` (how many such volumes), ``test.n_subjects``,
  ``test.site.<site>.mean_dice``
- privacy: ``privacy.epsilon`` (spent; inf if non-private), ``privacy.delta``, ``privacy.sigma``,
  ``privacy.sample_rate``, ``privacy.steps``, ``privacy.accountant``, ``privacy.guarantee``
- audit (``privseg audit`` records; NaN/None elsewhere): ``audit.epsilon_lower`` (the empirical
  lower bound on ε), ``audit.kind`` (gradient or input canaries), ``audit.canaries_m``,
  ``audit.broken`` (a deliberately broken mechanism: ``privseg audit --noise-fraction``),
  ``audit.fault`` (which: ``none``, ``noise0.1``, ``noclip``)
- timing: ``timing.<key>`` (total_s, train_s, median_step_s, subjects_per_s, peak_memory_mb …;
  splits as ``timing.<key>.<part>``, e.g. ``timing.cpu_s.eval_s``)
- the full run config flattened with dotted names under ``config.`` (``config.model.name``,
  ``config.training.epochs`` …)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from privseg.record import RECORD_NAME, last_validation_dice

_INF = ("inf", "Infinity", "+inf")


def _num(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):
        if v in _INF:
            return math.inf
        try:
            return float(v)
        except ValueError:
            return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": value}``; lists are kept as JSON text."""
    out: dict[str, Any] = {}
    for k, v in (data or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v)
        elif isinstance(v, dict):
            out[key] = None
        else:
            out[key] = v
    return out


def _width(model: str | None, options: dict) -> float | None:
    if "width" in (options or {}):
        return _num(options["width"])
    if model is None:
        return None
    try:
        from privseg.architectures import get_entry

        knobs = get_entry(model).knobs()
    except (KeyError, ImportError):
        return None
    return _num(knobs.get("width"))


def _accounting_columns(priv: dict) -> dict[str, Any]:
    """δ, σ, q and steps behind the reported ε.

    A central run and a site-level DP run have one of each (site level: steps = rounds done;
    σ the effective one, noise std / sensitivity, which SecAgg+'s rounding puts below the σ
    Flower scales by the clipping norm). Sample-level federated DP has them per site and
    reports the worst site's ε: its values are the ones behind that ε.
    """
    if priv.get("epsilon_per_site"):
        eps = priv["epsilon_per_site"]
        worst = max(eps, key=lambda s: _num(eps[s]) or 0.0)

        def pick(key):
            return (priv.get(key) or {}).get(worst)

        delta, sigma, q, steps = (pick("delta_per_site"), pick("noise_multiplier_per_site"),
                                  pick("sample_rate_per_site"), pick("steps_per_site"))
    else:
        delta, q = priv.get("delta"), priv.get("sample_rate")
        sigma = priv.get("noise_multiplier_effective", priv.get("noise_multiplier"))
        steps = priv.get("steps", priv.get("rounds_done"))
    return {"privacy.delta": _num(delta), "privacy.sigma": _num(sigma),
            "privacy.sample_rate": _num(q), "privacy.steps": steps}


def _audit_columns(audit: dict) -> dict[str, Any]:
    """An audit record's lower bound and how it was measured (``privseg audit``); NaN/None
    for runs without an audit."""
    low = _num(audit.get("epsilon_lower"))
    fault = audit.get("fault") or {}
    noise, clipping = fault.get("noise_fraction", 1.0), fault.get("clipping", True)
    tag = "-".join(([f"noise{noise:g}"] if noise != 1.0 else [])
                   + ([] if clipping else ["noclip"])) or "none"
    return {"audit.epsilon_lower": math.nan if low is None else low,
            "audit.kind": audit.get("kind"), "audit.canaries_m": audit.get("canaries_m"),
            "audit.guesses_r": audit.get("guesses_r"), "audit.correct_v": audit.get("correct_v"),
            "audit.broken": None if not audit else tag != "none",
            "audit.fault": tag if audit else None}


def _federated_columns(fed: dict, priv: dict) -> dict[str, Any]:
    """A federated run's bytes each site sent per round (mean over rounds), the dense model's
    bytes (full sharing), and an SVT run's ε per round; empty for other runs."""
    rows = [b for b in fed.get("bytes_per_round") or [] if b.get("sites")]
    if not rows:
        return {}
    up = sum(b["up"] / b["sites"] for b in rows) / len(rows)
    dense = _num(fed.get("parameter_payload_bytes"))
    out = {"federated.bytes_up_per_site": up, "federated.dense_bytes_up_per_site": dense,
           "federated.bytes_ratio": up / dense if dense else math.nan}
    if priv.get("mode") == "svt":
        out["privacy.epsilon_per_round"] = _num(priv.get("epsilon_per_round"))
    return out


def released_metrics(record: dict) -> dict[str, Any]:
    """The Dice of the weights a run releases for use: its EMA's (``record["ema"]``, De et al.
    2022's averaged weights, post-processing of the DP iterates) when it kept one, else the raw
    model's. An ablation that adds EMA compares these, not the raw weights it leaves behind."""
    ema = (record.get("ema") or {}).get("test") or {}
    source, name = (ema, "ema") if ema.get("dice") else (record.get("test") or {}, "raw")
    val = ((record.get("ema") or {}).get("val") or {}).get("mean_dice") if name == "ema" else (
        last_validation_dice(record))
    dice = {cls: _num(v) for cls, v in (source.get("dice") or {}).items()}
    present = [v for v in dice.values() if v is not None and not math.isnan(v)]
    return {"released.weights": name, "released.mean_dice": _num(source.get("mean_dice")),
            "released.val_mean_dice": _num(val),
            "released.min_dice": min(present) if present else None,
            "ema.test.mean_dice": _num(ema.get("mean_dice")) if ema else math.nan,
            **{f"released.dice.{cls}": v for cls, v in dice.items()}}


def record_row(record: dict) -> dict[str, Any]:
    """One run record -> one flat row."""
    cfg = record.get("config") or {}
    priv = record.get("privacy") or {}
    test = record.get("test") or {}
    model_cfg = cfg.get("model") or {}
    privacy_cfg = cfg.get("privacy") or {}
    private = bool(priv.get("enabled", privacy_cfg.get("enabled", False)))
    spent = _num(priv.get("epsilon"))
    if not private:
        eps_axis = math.inf
        spent = math.inf
    elif privacy_cfg.get("target_epsilon") is not None and privacy_cfg.get(
            "noise_multiplier") is None:
        eps_axis = _num(privacy_cfg.get("target_epsilon"))
    else:
        eps_axis = spent
    unit = priv.get("unit", "subject") if private else None
    setting = record.get("setting") or (cfg.get("setting") or {}).get("kind")
    if unit == "site":  # ε per whole site: not comparable with ε per subject, so its own group
        setting = f"{setting} (site-level DP)"
    elif priv.get("mode") == "svt" and private:  # pure ε, local DP per site update
        setting = f"{setting} (SVT, local DP per site update)"
    row: dict[str, Any] = {
        "run_id": record.get("run_id"),
        "name": record.get("name") or cfg.get("name") or record.get("run_id"),
        "sweep": (cfg.get("tracking") or {}).get("group"),
        "status": record.get("status"),
        "dataset": (record.get("dataset") or {}).get("name") or (cfg.get("dataset") or {}).get(
            "name"),
        "model": model_cfg.get("name"),
        "width": _width(model_cfg.get("name"), model_cfg.get("options") or {}),
        "setting": setting,
        "seed": cfg.get("seed"),
        "epsilon": eps_axis,
        "private": private,
        "test.mean_dice": _num(test.get("mean_dice")),
        "test.mean_hd95": _num(test.get("mean_hd95")),
        "test.n_subjects": test.get("n_subjects"),
        "test.n_empty_pred": test.get("n_empty_pred"),
        "privacy.epsilon": spent,
        "privacy.unit": unit,
        "privacy.mode": priv.get("mode") if private else None,
        **_accounting_columns(priv),
        "privacy.accountant": priv.get("accountant"),
        "privacy.guarantee": priv.get("guarantee"),
        **_audit_columns(record.get("audit") or {}),
        **_federated_columns(record.get("federated") or {}, priv if private else {}),
        **released_metrics(record),
    }
    for cls, v in (test.get("dice") or {}).items():
        row[f"test.dice.{cls}"] = _num(v)
    for cls, v in (test.get("hd95") or {}).items():
        row[f"test.hd95.{cls}"] = _num(v)
    for cls, v in (test.get("empty_pred") or {}).items():
        row[f"test.empty_pred.{cls}"] = v
    for site, m in (test.get("per_site") or {}).items():
        row[f"test.site.{site}.mean_dice"] = _num((m or {}).get("mean_dice"))
        row[f"test.site.{site}.n_subjects"] = (m or {}).get("n_subjects")
    # nested splits (eval_split_s, cpu_s, site_compute_split_s) as timing.<key>.<part>;
    # nulls left out, as in W&B, whose summary holds none
    row.update({k: v for k, v in flatten(record.get("timing") or {}, "timing.").items()
                if v is not None})
    row.update(flatten(cfg, "config."))
    return row


def find_records(root: str | Path) -> list[Path]:
    """Every complete-or-not ``record.json`` under ``root`` (a run dir or an output dir)."""
    root = Path(root)
    if (root / RECORD_NAME).is_file():
        return [root / RECORD_NAME]
    return sorted(p for p in root.rglob(RECORD_NAME) if ".sweeps" not in p.parts)


def read_records(paths: Iterable[Path]) -> list[dict]:
    out = []
    for p in paths:
        try:
            rec = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("status") == "complete":
            out.append(rec)
    return out


def frame(records: Iterable[dict]) -> pd.DataFrame:
    """Records -> tidy DataFrame (one row per run, stable column order)."""
    rows = [record_row(r) for r in records]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["run_id", "sweep", "model", "epsilon", "seed",
                                     "test.mean_dice"])
    prefixes = ("test.dice.", "test.hd95.", "test.empty_pred.", "test.site.", "released.dice.",
                "timing.", "config.")
    front = [c for c in rows[0] if not c.startswith(prefixes)]
    groups = [sorted(c for c in df.columns if c.startswith(p)) for p in prefixes]
    ordered = front + [c for g in groups for c in g]
    ordered += [c for c in df.columns if c not in ordered]
    return df[ordered].sort_values(["sweep", "model", "epsilon", "seed"],
                                   na_position="last", kind="stable").reset_index(drop=True)


def load(source: str | Path, *, run_ids: Iterable[str] | None = None,
         api: Any = None) -> pd.DataFrame:
    """All runs at ``source`` as one tidy DataFrame.

    ``source`` is an output directory (searched recursively for ``record.json``), one run
    directory, or ``wandb:ENTITY/PROJECT`` (optionally ``wandb:ENTITY/PROJECT/GROUP``) for runs
    in W&B (through ``api``, default ``wandb.Api()``; an
    :class:`privseg.results.wandb_offline.OfflineApi` reads offline W&B folders instead).
    The same runs give the same DataFrame from their records and from W&B.
    ``run_ids`` keeps only those runs.
    """
    src = str(source)
    if src.startswith("wandb:"):
        df = load_wandb(src[len("wandb:"):], api)
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such directory")
        df = frame(read_records(find_records(path)))
    if run_ids is not None:
        keep = set(run_ids)
        df = df[df["run_id"].isin(keep)].reset_index(drop=True)
    return df


def wandb_run_record(run: Any) -> dict:
    """A W&B run (public API object) as a pseudo-record ``record_row`` understands.

    The run's config is the full run config (the tracker logs it); test metrics come from the
    summary that :func:`privseg.central.summary_scalars` writes (``test/mean_dice``,
    ``test/dice/<class>``, ``test/per_site/<site>/mean_dice``, ``privacy/*``, ``timing/*``).
    """
    cfg = {k: v for k, v in dict(run.config or {}).items() if not k.startswith("_")}
    summary = dict(getattr(run.summary, "_json_dict", None) or run.summary or {})
    test: dict[str, Any] = {"dice": {}, "hd95": {}, "empty_pred": {}, "per_site": {}}
    privacy: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    averages: dict[str, dict] = {}
    history: list[dict] = []
    for k, v in summary.items():
        parts = k.split("/")
        if parts[0] in ("ema", "polyak") and len(parts) >= 3 and parts[1] in ("test", "val"):
            split = averages.setdefault(parts[0], {}).setdefault(parts[1], {})
            if len(parts) == 3:
                split[parts[2]] = v
            elif len(parts) == 4:
                split.setdefault(parts[2], {})[parts[3]] = v
        elif k == "val/mean_dice":
            history = [{"val_mean_dice": v}]
        elif parts[0] == "test":
            if len(parts) == 2:
                test[parts[1]] = v
            elif len(parts) == 3 and parts[1] in ("dice", "hd95", "empty_pred"):
                test[parts[1]][parts[2]] = v
            elif len(parts) == 4 and parts[1] in ("per_site", "site"):  # "site": before 0.1
                test["per_site"].setdefault(parts[2], {})[parts[3]] = v
        elif parts[0] == "privacy" and len(parts) == 2:
            privacy[parts[1]] = v
        elif parts[0] == "timing" and len(parts) == 2:
            timing[parts[1]] = v
        elif parts[0] == "timing" and len(parts) == 3:  # a split: timing/eval_split_s/...
            timing.setdefault(parts[1], {})[parts[2]] = v
    privacy.setdefault("enabled", (cfg.get("privacy") or {}).get("enabled", False))
    status = "complete" if run.state == "finished" else run.state
    return {"run_id": run.id, "name": cfg.get("name") or run.name, "status": status,
            "config": cfg, "setting": (cfg.get("setting") or {}).get(
            "kind"), "test": test, "privacy": privacy, "timing": timing,
            "dataset": {"name": (cfg.get("dataset") or {}).get("name")},
            "history": history, **averages}


def load_wandb(path: str, api: Any = None) -> pd.DataFrame:
    """Finished runs of ``ENTITY/PROJECT`` (or ``ENTITY/PROJECT/GROUP``) from W&B."""
    parts = path.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"wandb:{path}: expected wandb:ENTITY/PROJECT[/GROUP]")
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": parts[2]} if len(parts) == 3 else None
    runs = api.runs("/".join(parts[:2]), filters=filters)
    records = [wandb_run_record(r) for r in runs]
    return frame([r for r in records if r["status"] == "complete"])
