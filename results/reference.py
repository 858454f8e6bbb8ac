"""Committed reference numbers and their comparison with a rerun (``privseg reproduce``).

``reference/index.json`` maps a table name to the sweep behind it (quick and full variant)
and to the committed per-run CSV written from a real run by :func:`write_reference`. The CSV
starts with ``#`` lines naming the command, date and machine that produced it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import platform
from importlib import resources
from pathlib import Path

import pandas as pd

from privseg.results.tables import METRIC, aggregate, class_columns, eps_label, group_keys

REFERENCE_COLUMNS = ["run_id", "model", "width", "setting", "seed", "epsilon",
                     "test.mean_dice", "test.mean_hd95", "privacy.epsilon", "privacy.sigma",
                     "timing.total_s"]


def reference_dir() -> Path:
    return Path(str(resources.files("privseg.results") / "reference"))


def reference_index() -> dict:
    path = reference_dir() / "index.json"
    return json.loads(path.read_text()) if path.exists() else {}


def table_entry(name: str, quick: bool) -> dict:
    index = reference_index()
    if name not in index:
        raise KeyError(f"no table {name!r}; known: {', '.join(sorted(index)) or 'none'}")
    variant = "quick" if quick else "full"
    entry = index[name].get(variant)
    if entry is None:
        raise KeyError(f"table {name!r} has no {variant} variant")
    return {"title": index[name].get("title", name), "variant": variant, **entry}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_reference(df: pd.DataFrame, path: Path, *, command: str, sweep_file: Path | None
                    ) -> Path:
    """Write the per-run reference CSV (with a ``#`` header: command, date, machine)."""
    cols = [c for c in REFERENCE_COLUMNS if c in df] + class_columns(df)
    m = machine()
    header = [f"# command: {command}",
              f"# date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
              f"# machine: {json.dumps(m, sort_keys=True)}"]
    if sweep_file is not None:
        header.append(f"# sweep: {Path(sweep_file).name} sha256:{file_sha256(sweep_file)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = df[cols].sort_values(["model", "epsilon", "seed"]).to_csv(index=False)
    path.write_text("\n".join(header) + "\n" + body)
    return path


def read_reference(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """The reference CSV as a DataFrame, and its ``#`` header fields."""
    lines = Path(path).read_text().splitlines()
    meta = {}
    body = []
    for ln in lines:
        if ln.startswith("#") and not body:
            k, _, v = ln[1:].strip().partition(":")
            meta[k.strip()] = v.strip()
        else:
            body.append(ln)
    df = pd.read_csv(io.StringIO("\n".join(body)))
    df["epsilon"] = df["epsilon"].astype(float)
    return df, meta


def compare(reference: pd.DataFrame, new: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Reference vs new, per architecture × ε: mean ± std of each and the difference."""
    keys = [k for k in group_keys(reference) if k in new]
    ref = aggregate(reference, [metric], keys)
    cur = aggregate(new, [metric], keys) if not new.empty else ref.iloc[0:0]
    merged = ref.merge(cur, on=keys + ["epsilon"], how="outer", suffixes=(".ref", ".new"))
    merged = (merged.assign(_o=-merged["epsilon"].astype(float))
              .sort_values(keys + ["_o"], kind="stable").drop(columns="_o"))
    rows = []
    for _, r in merged.iterrows():
        row = {k: r[k] for k in keys}
        row["ε"] = eps_label(r["epsilon"])
        mr, sr = r.get(f"{metric}.mean.ref"), r.get(f"{metric}.std.ref")
        mn, sn = r.get(f"{metric}.mean.new"), r.get(f"{metric}.std.new")
        row["reference"] = _pm(mr, sr)
        row["new"] = _pm(mn, sn)
        row["Δ mean"] = (f"{mn - mr:+.4f}" if _ok(mn) and _ok(mr) else "–")
        row["seeds (ref/new)"] = (f"{_int(r.get('n_seeds.ref'))}/{_int(r.get('n_seeds.new'))}")
        rows.append(row)
    return pd.DataFrame(rows)


def per_run_agreement(reference: pd.DataFrame, new: pd.DataFrame, metric: str = METRIC,
                      tol: float = 1e-6) -> tuple[int, int, float]:
    """Runs present in both (same run id = same config): how many agree within ``tol``,
    how many were compared, and the largest absolute difference."""
    m = reference[["run_id", metric]].merge(new[["run_id", metric]], on="run_id",
                                            suffixes=(".ref", ".new"))
    if m.empty:
        return 0, 0, float("nan")
    diff = (m[f"{metric}.ref"] - m[f"{metric}.new"]).abs()
    return int((diff <= tol).sum()), len(m), float(diff.max())


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _int(x) -> str:
    return str(int(x)) if _ok(x) else "0"


def _pm(m, s) -> str:
    if not _ok(m):
        return "–"
    return f"{m:.4f}" if not _ok(s) else f"{m:.4f} ± {s:.4f}"
