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

from privseg.results.grouping import VARIANT, differing_keys
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
    """Write the per-run reference CSV (with a ``#`` header: command, date, machine).

    Config keys in which runs of one row differ besides the seed (e.g. the fraction shared)
    are kept as columns, so the comparison keeps those runs apart as the live table does."""
    cols = ([c for c in REFERENCE_COLUMNS if c in df] + differing_keys(df, group_keys(df))
            + class_columns(df))
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
    if VARIANT in ref or VARIANT in cur:  # runs differing in more than the seed: own rows
        ref, cur = (a if VARIANT in a else a.assign(**{VARIANT: ""}) for a in (ref, cur))
        keys = [*keys, VARIANT]
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
        row["agrees"] = _agrees(mr, sr, r.get("n_seeds.ref"), mn, sn, r.get("n_seeds.new"))
        rows.append(row)
    return pd.DataFrame(rows)


#: a rerun of a reproducible run on the reference's machine and versions must agree to this
EXACT_TOL = 1e-6
#: a DP cell (secret noise: every rerun draws new noise) agrees when its mean is within this
#: many standard errors of the difference of the two means
SE_TOL = 3.0
#: what must match for a reproducible run to reproduce exactly
MACHINE_KEYS = ("cpu", "python", "torch")


def reproducible(df: pd.DataFrame) -> pd.Series:
    """Runs whose numbers a rerun must reproduce exactly: non-private runs, and DP runs that
    opted into reproducible noise (``privacy.noise_seed``). Other DP runs draw secret noise."""
    out = df["epsilon"].astype(float).map(math.isinf)
    if "config.privacy.noise_seed" in df:
        out |= df["config.privacy.noise_seed"].notna() & df["private"].astype(bool)
    return out


def per_run_agreement(reference: pd.DataFrame, new: pd.DataFrame, metric: str = METRIC,
                      tol: float = EXACT_TOL) -> tuple[int, int, float]:
    """Reproducible runs (see :func:`reproducible`) present in both (same run id = same
    config): how many agree within ``tol``, how many were compared, the largest |Δ|."""
    keep = new[reproducible(new)]
    m = reference[["run_id", metric]].merge(keep[["run_id", metric]], on="run_id",
                                            suffixes=(".ref", ".new"))
    if m.empty:
        return 0, 0, float("nan")
    diff = (m[f"{metric}.ref"] - m[f"{metric}.new"]).abs()
    return int((diff <= tol).sum()), len(m), float(diff.max())


def machine_differences(meta: dict[str, str]) -> list[str]:
    """What differs between the reference's machine (its CSV header) and this one."""
    try:
        ref = json.loads(meta.get("machine", "{}"))
    except json.JSONDecodeError:
        return ["the reference names no machine"]
    here = machine()
    return [f"{k} {ref.get(k)!r} there, {here.get(k)!r} here" for k in MACHINE_KEYS
            if ref.get(k) != here.get(k)]


def agreement_text(reference: pd.DataFrame, new: pd.DataFrame, meta: dict[str, str],
                   metric: str = METRIC) -> tuple[str, bool]:
    """What a reviewer may conclude, stated plainly; and whether the rerun agrees.

    Reproducible runs on a matching machine must agree to :data:`EXACT_TOL`; on another
    machine or versions they may differ in the last digits (float kernels differ), and that
    is said. DP cells agree when within :data:`SE_TOL` standard errors (the ``agrees`` column
    of :func:`compare`); their noise is secret, so no DP run repeats exactly.
    """
    same, n, worst = per_run_agreement(reference, new, metric)
    diffs = machine_differences(meta)
    lines, ok = [], True
    rerun = set(new["run_id"]) if "run_id" in new else set()
    missing = [r for r in reference["run_id"] if r not in rerun]
    if missing:  # a failed or skipped run is no agreement, whatever the cells around it say
        ok = False
        lines.append(f"{len(missing)} of the reference's {len(reference)} runs are not in the "
                     "rerun (failed or not run): the table is not reproduced.")
    if n:
        lines.append(f"reproducible runs (non-private, or reproducible DP noise) in both: {n}; "
                     f"{same} equal to {EXACT_TOL:g} (largest |Δ| {worst:.2e}).")
        if diffs:
            lines.append("This machine differs from the reference's (" + "; ".join(diffs)
                         + "): such runs are expected to differ slightly, not to repeat "
                           "exactly.")
        elif same < n:
            ok = False
            lines.append("Same CPU, Python and torch as the reference, yet they differ: "
                         "this is a reproduction failure.")
        else:
            lines.append("Same CPU, Python and torch as the reference: they reproduce "
                         "exactly.")
    table = compare(reference, new, metric)
    # on another machine reproducible runs need not repeat exactly, so their cells are held
    # to the standard-error test of the DP cells rather than to nothing
    rows = table if table.empty or diffs else table[table["ε"] != "non-private"]
    if len(rows):
        off = int(rows["agrees"].str.startswith("no").sum())
        what = ("Cells by mean over seeds (on another machine the non-private ones too)"
                if diffs else "DP cells by mean over seeds")
        lines.append(f"{what} (DP runs without privacy.noise_seed draw fresh secret noise and "
                     f"never repeat exactly): {len(rows) - off} of {len(rows)} within "
                     f"{SE_TOL:g} standard errors of the reference.")
        ok = ok and off == 0
    return "\n".join(lines), ok


def _agrees(mr, sr, nr, mn, sn, nn) -> str:
    """``exact`` (to EXACT_TOL), ``yes`` (within SE_TOL standard errors), ``no``, or ``–``
    (a cell the reference does not have)."""
    if not _ok(mr):
        return "–"
    if not _ok(mn):
        return "no (not in the rerun)"
    d = abs(mn - mr)
    if d <= EXACT_TOL:
        return "exact"
    if not (_ok(sr) and _ok(sn)) or not (_ok(nr) and _ok(nn)):
        return "no (one seed: no spread to compare against)"
    se = math.sqrt(sr**2 / nr + sn**2 / nn)
    return "yes" if d <= SE_TOL * se else "no"


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _int(x) -> str:
    return str(int(x)) if _ok(x) else "0"


def _pm(m, s) -> str:
    if not _ok(m):
        return "–"
    return f"{m:.4f}" if not _ok(s) else f"{m:.4f} ± {s:.4f}"
