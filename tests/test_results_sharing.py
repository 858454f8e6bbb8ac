"""The li2019 reproduction's table, bytes and figure (privseg.results.sharing), from records."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_results import make_record

from privseg.record import write_record
from privseg.results.reference import compare, read_reference, write_reference
from privseg.results.sharing import bytes_table, dice_vs_fraction, sharing_table
from privseg.results.store import load

DENSE = 10_000  # bytes of the dense model


def dice(series: str, f: float, eps: float) -> float:
    """A distinct Dice for every cell, so a cell taken from the wrong run shows."""
    return {"none": 0.8, "svt": 0.5, "site": 0.3}[series] + 0.01 * f + (
        0 if math.isinf(eps) else 1e-3 * math.log10(eps))


def sharing_record(series: str, f: float, eps: float, rounds: int = 20) -> dict:
    rec = make_record("unet", eps, 0, setting="federated")
    rec["run_id"] = rec["name"] = f"{series}-{f}-{eps}"
    rec["config"]["setting"] = {"kind": "federated", "federated": {
        "share_fraction": f, "dp_mode": series, "rounds": rounds}}
    rec["test"]["mean_dice"] = dice(series, f, eps)
    up = 3 * (DENSE * f + 320)  # three sites
    rec["federated"] = {"parameter_payload_bytes": DENSE, "bytes_per_round": [
        {"round": r, "up": up, "down": 3 * DENSE, "sites": 3} for r in range(1, rounds + 1)]}
    if series == "svt":
        rec["privacy"] = {"enabled": True, "mode": "svt", "unit": "one site's whole update",
                          "epsilon": eps, "delta": 0.0, "epsilon_per_round": eps / rounds}
    elif series == "site":
        rec["privacy"] = {"enabled": True, "mode": "site", "unit": "site", "epsilon": eps,
                          "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 1.0,
                          "rounds_done": rounds}
    return rec


@pytest.fixture
def runs(tmp_path) -> pd.DataFrame:
    out = tmp_path / "runs"
    recs = [sharing_record("none", f, math.inf) for f in (1.0, 0.4, 0.1)]
    recs += [sharing_record("svt", f, e) for f in (1.0, 0.4, 0.1) for e in (1e8, 10.0)]
    recs += [sharing_record("site", 1.0, e) for e in (1e8, 10.0)]
    for r in recs:
        write_record(out / r["run_id"], r)
    return load(out)


def test_table_cells_are_the_runs_of_their_series_fraction_and_epsilon(runs):
    t = sharing_table(runs).set_index("ε per site, all rounds")
    assert list(t.index) == ["∞", "1e+08", "10"]
    assert [c for c in t.columns if c.startswith("Dice")] == [
        "Dice @ shared 1", "Dice @ shared 0.4", "Dice @ shared 0.1"]
    for eps, key in ((1e8, "1e+08"), (10.0, "10")):
        for f in (1.0, 0.4, 0.1):
            assert t.loc[key, f"Dice @ shared {f:g}"] == f"{dice('svt', f, eps):.3f}"
        assert t.loc[key, "FedAvg / DP-FedAvg (full sharing)"] == f"{dice('site', 1, eps):.3f}"
        assert t.loc[key, "SVT ε per round"] == f"{eps / 20:g}"
        assert t.loc[key, "DP-FedAvg δ"] == "1e-05"
    assert t.loc["∞", "Dice @ shared 0.4"] == f"{dice('none', 0.4, math.inf):.3f}"
    assert t.loc["∞", "FedAvg / DP-FedAvg (full sharing)"] == f"{dice('none', 1, math.inf):.3f}"


def test_bytes_per_round_against_full_sharing(runs):
    b = bytes_table(runs)
    svt = b[(b["series"] == "SVT") & (b["fraction"] == 0.1) & (b["ε"] == "ε = 10")].iloc[0]
    assert svt["runs"] == 1 and svt["bytes up per site per round"] == f"{DENSE * 0.1 + 320:,.0f}"
    assert float(svt["ratio"]) == pytest.approx((DENSE * 0.1 + 320) / DENSE, abs=1e-3)
    assert list(b["series"]) == ["no DP"] * 3 + ["SVT"] * 6 + ["DP-FedAvg"] * 2


def test_figure_draws_each_series_at_its_fractions_with_delta_and_unit(runs):
    fig = dice_vs_fraction(runs)
    ax = fig.axes[0]
    labels = ax.get_legend().get_texts()
    text = [t.get_text() for t in labels]
    assert "SVT, ε = 1e+08, 5e+06 per round, δ = 0" in text
    assert "DP-FedAvg, ε = 10, δ = 1e-05 (full sharing)" in text
    assert any(t.startswith("no DP") for t in text)
    assert "fraction" in ax.get_xlabel()
    notes = fig.get_supxlabel()
    assert "one site's whole update" in notes and "δ = 0" in notes
    bars = {c.get_label(): c.lines[0] for c in ax.containers}  # one errorbar per series
    line = next(ln for k, ln in bars.items() if k.startswith("SVT, ε = 10,"))
    assert sorted(zip(line.get_xdata(), line.get_ydata(), strict=True)) == pytest.approx(
        sorted((f, dice("svt", f, 10.0)) for f in (1.0, 0.4, 0.1)))
    assert dice_vs_fraction(runs.drop(columns="config.setting.federated.share_fraction")) is None


def test_reference_keeps_runs_that_differ_in_the_fraction_apart(runs, tmp_path):
    path = write_reference(runs, tmp_path / "ref.csv", command="test", sweep_file=None)
    ref, _ = read_reference(path)
    assert "config.setting.federated.share_fraction" in ref
    table = compare(ref, runs)
    assert len(table) == len(runs)  # one row per run: nothing pooled across fractions
    assert set(table["agrees"]) == {"exact"}


def test_published_numbers_are_printed_beside_the_matching_runs(runs):
    from privseg.results.reference import table_entry
    from privseg.results.sharing import published_table

    published = table_entry("li2019", quick=False)["published"]
    assert (published["central"], published["fedavg"], published["fedavg+svt"]) == (
        0.856, 0.857, 0.821)  # NVFlare's BraTS 2018 example
    t = published_table(runs, published).set_index("run")
    rows = list(t.index)
    assert t.loc[rows[1], "published"] == 0.857
    assert t.loc[rows[1], "privseg (this rerun)"] == f"{dice('none', 1, math.inf):.3f}"
    assert t.loc[rows[0], "privseg (this rerun)"] == "–"  # no central run in the study
    svt = t.loc[rows[2], "privseg (this rerun)"]
    assert f"{dice('svt', 0.1, 1e8):.3f} (ε 1e+08, shared 0.1)" in svt
    assert svt.count("(ε ") == 6  # every SVT cell, none of the DP-FedAvg or no-DP runs


def test_committed_li2019_reference_is_the_shipped_sweep_run():
    """The committed numbers come from `privseg reproduce li2019 --quick` on the sweep as
    shipped (its hash), one run per fraction × ε × series, with its figure beside."""
    from privseg.results.reference import file_sha256, reference_dir, table_entry
    from privseg.sweeps.spec import resolve_sweep_path

    entry = table_entry("li2019", quick=True)
    ref, meta = read_reference(reference_dir() / entry["reference"])
    assert meta["command"].startswith("privseg reproduce li2019 --quick")
    sweep = resolve_sweep_path(entry["sweep"])
    assert meta["sweep"] == f"{sweep.name} sha256:{file_sha256(sweep)}"
    cells = set(zip(ref["setting"], ref["config.setting.federated.share_fraction"],
                    ref["epsilon"], strict=True))
    assert len(cells) == len(ref) == 15  # 3 no-DP + 3 fractions × 3 ε SVT + 3 DP-FedAvg
    assert (reference_dir() / entry["figure"]).stat().st_size > 10_000
