"""The fault matrix on a live SuperLink: one testbed run per fault, a table of the outcomes.

Usage (root for namespaces; PATH with the environment's Flower commands first):

    python tests/support/fault_matrix.py CONFIG.yaml OUT_DIR [--round-timeout 90] [--only KIND]

Each fault of :data:`FAULTS` runs ``privseg federated testbed CONFIG --fault ...`` in its own
folder; the table (Markdown, also ``OUT_DIR/fault-matrix.md``) has, per fault, what the testbed
did and saw (its events, its exit status and last line) and what the record says (status,
rounds, sites per round, missed rounds and why, ε per site).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FAULTS = {
    "baseline": [],
    "kill": ["kill:site-B@2"],
    "restart-now": ["restart:site-B@2+0"],
    "restart-later": ["restart:site-B@2+100"],
    "linkdown": ["linkdown:site-B@2+20"],
    "straggler": ["straggle:site-C@2+{straggle}"],
    "superlink": ["superlink@2+5"],
}


def summary(record: dict | None) -> str:
    """What the record says, in one cell."""
    if record is None:
        return "no record"
    h = record.get("history", [])
    missed = "; ".join(f"r{r['round']}: {m['site']} ({m['reason'][:60]})"
                       for r in h for m in r.get("missed", [])) or "none"
    eps = {s: round(e, 3) for s, e in record["privacy"].get("epsilon_per_site", {}).items()}
    sites = " / ".join(",".join(s[-1] for s in r["sites"]) for r in h)
    return (f"{record.get('status')}, {len(h)} rounds, sites {sites}; missed: {missed}; "
            f"ε {eps}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out", type=Path)
    ap.add_argument("--round-timeout", type=float, default=90.0)
    ap.add_argument("--only", action="append")
    ap.add_argument("--no-netns", action="store_true")
    a = ap.parse_args()
    rows = []
    for name, faults in FAULTS.items():
        if a.only and name not in a.only:
            continue
        faults = [f.format(straggle=a.round_timeout + 20) for f in faults]
        work = a.out / name
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", "from privseg.cli import main; main()", "federated",
               "testbed", a.config, "--sites", "3", "--workdir", str(work / "tb"),
               "--round-timeout", str(a.round_timeout), "--output", str(work / "runs"),
               "--max-wait", "300"] + [x for f in faults for x in ("--fault", f)] + (
            ["--no-netns"] if a.no_netns else [])
        t = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - t
        (work / "stdout.txt").write_text(p.stdout + p.stderr)
        records = list((work / "runs").glob("*/record.json"))
        record = json.loads(records[0].read_text()) if records else None
        events = "; ".join(e["what"] for e in (record or {}).get("testbed", {}).get(
            "events", []))
        last = (p.stdout.strip().splitlines() or [""])[-1][:160]
        rows.append(f"| {name} `{' '.join(faults) or '-'}` | {events or '-'}; exit "
                    f"{p.returncode} after {wall:.0f} s: {last} | {summary(record)} |")
        print(rows[-1], flush=True)
    table = "| fault | what happened | what the record says |\n|---|---|---|\n" + "\n".join(
        rows) + "\n"
    (a.out / "fault-matrix.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
