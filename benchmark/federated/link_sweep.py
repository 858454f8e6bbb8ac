"""Round time against link bandwidth, full sharing against partial sharing, on the testbed.

For each ``share_fraction`` and each set of per-site bandwidths, one testbed run
(:func:`privseg.federated.testbed.run_testbed`) with the sites' links shaped to those
bandwidths; from its record's ``links`` section one row per site and round: the bandwidth, the
bytes up and down counted on the wire, the time from the round's start until the site's
update had arrived (``last_up_s``) and the round's wall time. Several sites with different
bandwidths in one run share the run's start-up cost; ``last_up_s`` is each site's own.
Partial sharing (``share_fraction`` < 1, top-k or random coordinates sent as indices +
values) shrinks what goes up; the global model still comes down dense.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from privseg.config import parse_config
from privseg.federated.deadline import checked_round_timeout

COLUMNS = ["share_fraction", "slowest_mbit", "site", "bandwidth_mbit", "latency_ms", "round",
           "last_up_s", "wall_s", "bytes_up", "bytes_down"]


def sweep_config(base: dict, fraction: float, bandwidths: dict[str, float | None],
                 latency_ms: float, output_dir: Path) -> dict:
    """``base`` with ``share_fraction`` and one link profile per site (None: unshaped)."""
    d = copy.deepcopy(base)
    fed = d["setting"]["federated"]
    fed["share_fraction"] = fraction
    fed["links"] = {s: {"bandwidth_mbit": b, "latency_ms": latency_ms}
                    for s, b in bandwidths.items()}
    d.setdefault("output", {})["dir"] = str(output_dir)
    return d


def rows_of(record: dict, fraction: float) -> list[dict]:
    """One row per site and round of a testbed record (see :data:`COLUMNS`)."""
    links = record["links"]
    shaped = [p["bandwidth_mbit"] for p in links["profiles"].values() if p["bandwidth_mbit"]]
    slowest = min(shaped) if shaped else None  # an unshaped link is the fastest
    out = []
    for r in links["per_round"]:
        for site, v in r["sites"].items():
            p = links["profiles"][site]
            out.append({"share_fraction": fraction, "slowest_mbit": slowest, "site": site,
                        "bandwidth_mbit": p["bandwidth_mbit"], "latency_ms": p["latency_ms"],
                        "round": r["round"], "last_up_s": v["last_up_s"], "wall_s": r["wall_s"],
                        "bytes_up": v["bytes_up"], "bytes_down": v["bytes_down"]})
    return out


def link_sweep(base: dict, bandwidth_sets: list[dict[str, float | None]],
               fractions: list[float], workdir: Path, *, latency_ms: float = 0.0,
               use_netns: bool = True, round_timeout: float | None = None, log=print):
    """Run every (fraction, bandwidth set) on the testbed; a DataFrame of :data:`COLUMNS`."""
    import pandas as pd

    from privseg.federated.testbed import run_testbed

    round_timeout = checked_round_timeout(round_timeout)
    rows = []
    for fraction in fractions:
        for i, bandwidths in enumerate(bandwidth_sets):
            point = Path(workdir) / f"f{fraction:g}-b{i}"
            point.mkdir(parents=True, exist_ok=True)
            d = sweep_config(base, fraction, bandwidths, latency_ms, point / "runs")
            path = point / "config.yaml"
            path.write_text(yaml.safe_dump(d, sort_keys=False))
            log(f"link sweep: share_fraction {fraction:g}, bandwidths {bandwidths}")
            record = run_testbed(parse_config(d), path, len(bandwidths), point / "testbed",
                                 use_netns=use_netns, round_timeout=round_timeout, log=log)
            rows += rows_of(record, fraction)
    return pd.DataFrame(rows, columns=COLUMNS)


def plot_link_sweep(df, path: Path) -> Path:
    """Round wall time against the bandwidth of the run's slowest link (a synchronous round
    waits for it), one line per share fraction, mean over rounds; all links unshaped drawn at
    the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shaped = df["slowest_mbit"].dropna()
    edge = 4 * shaped.max() if len(shaped) else 1.0
    rounds = df.drop_duplicates(["share_fraction", "slowest_mbit", "round"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for fraction, g in rounds.groupby("share_fraction"):
        m = g.groupby(g["slowest_mbit"].fillna(edge))["wall_s"].mean()
        up = df[df["share_fraction"] == fraction]["bytes_up"].mean()
        ax.plot(m.index, m.values, "o-", label=f"share_fraction {fraction:g} "
                                                f"(≈{up / 1e3:.0f} kB up per site-round)")
    ax.set_xscale("log")
    ax.set_xlabel("slowest site link (Mbit/s; right edge: all unshaped)")
    ax.set_ylabel("round wall time (s)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
