"""Results store, tables and figures, on hand-made records with known numbers."""

from __future__ import annotations

import functools
import io
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from privseg.config import parse_config
from privseg.record import write_record
from privseg.results.store import _accounting_columns, load, load_wandb
from privseg.results.tables import aggregate, render, summary_table

CLASSES = ["grey_matter", "white_matter"]
SITES = ["site-A", "site-B"]


def dice_of(model: str, eps: float, seed: int, setting: str = "central",
            width: float = 1.0) -> float:
    base = {"unet": 0.80, "resunet-scalenorm": 0.75}[model]
    drop = 0.0 if math.isinf(eps) else 0.4 / eps
    return base - drop + 0.01 * seed - (0.05 if setting == "federated" else 0.0) + 0.02 * width


@functools.cache
def _config(model: str, width: float | None) -> dict:
    return parse_config({
        "dataset": {"name": "phantom", "options": {"n_subjects": 12, "size": 16}},
        "model": {"name": model, "options": {} if width is None else {"width": width}},
        "tracking": {"wandb": "off"},
    }).model_dump(mode="json")


def make_record(model: str, eps: float, seed: int, setting: str = "central",
                width: float | None = None, sweep: str = "toy") -> dict:
    private = math.isfinite(eps)
    cfg = json.loads(json.dumps(_config(model, width)))
    cfg["seed"] = seed
    cfg["privacy"].update(enabled=private, target_epsilon=eps if private else 8.0)
    cfg["tracking"]["group"] = sweep
    cfg["setting"] = {"kind": setting}  # records of federated runs, as the engine writes them
    d = dice_of(model, eps, seed, setting, width or 1.0)
    per_class = {"grey_matter": d - 0.05, "white_matter": d + 0.05}
    run_id = f"{model}-{eps}-{seed}-{setting}-{width}"
    return {
        "run_id": run_id, "name": run_id, "config": cfg, "setting": setting,
        "dataset": {"name": "phantom", "class_names": ["background", *CLASSES]},
        "test": {"dice": per_class, "mean_dice": d, "hd95": {c: 3.0 for c in CLASSES},
                 "mean_hd95": 3.0 + seed, "n_subjects": 4,
                 "per_site": {s: {"mean_dice": d - 0.02 * i, "n_subjects": 2}
                              for i, s in enumerate(SITES)}},
        "privacy": ({"enabled": True, "epsilon": eps - 0.001, "delta": 1e-3,
                     "noise_multiplier": 1.0 / eps, "sample_rate": 0.5, "steps": 10,
                     "accountant": "prv"} if private else
                    {"enabled": False, "epsilon": math.inf}),
        "timing": {"total_s": 10.0 + seed, "train_s": 5.0},
    }


@pytest.fixture
def store(tmp_path) -> Path:
    for model in ["unet", "resunet-scalenorm"]:
        for eps in [math.inf, 8.0, 1.0]:
            for seed in [0, 1, 2]:
                rec = make_record(model, eps, seed)
                write_record(tmp_path / rec["run_id"], rec)
    # An unfinished run (no complete record) is not a result.
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "record.json").write_text(json.dumps({"status": "running"}))
    return tmp_path


def test_load_directory_columns_and_rows(store):
    df = load(store)
    assert len(df) == 18
    for col in ["run_id", "sweep", "model", "width", "setting", "seed", "epsilon", "private",
                "test.mean_dice", "test.dice.grey_matter", "test.dice.white_matter",
                "test.mean_hd95", "test.hd95.grey_matter", "test.site.site-A.mean_dice",
                "privacy.epsilon", "privacy.delta", "privacy.sigma", "timing.total_s",
                "config.model.name", "config.training.epochs", "config.privacy.enabled"]:
        assert col in df.columns, col
    assert set(df["sweep"]) == {"toy"}
    assert df["width"].eq(1.0).all()  # unet's registry default filled in
    nonpriv = df[~df["private"]]
    assert len(nonpriv) == 6 and nonpriv["epsilon"].map(math.isinf).all()
    assert nonpriv["privacy.epsilon"].map(math.isinf).all()
    assert df.loc[df["epsilon"] == 8.0, "privacy.epsilon"].eq(7.999).all()
    assert load(store, run_ids=[df["run_id"][0]]).shape[0] == 1


def test_table_numbers_equal_hand_computation(store):
    df = load(store)
    table = summary_table(df)
    assert list(table.columns) == ["model", "non-private", "ε = 8", "ε = 1", "seeds"]
    for model in ["unet", "resunet-scalenorm"]:
        row = table[table["model"] == model].iloc[0]
        for eps, col in [(math.inf, "non-private"), (8.0, "ε = 8"), (1.0, "ε = 1")]:
            vals = [dice_of(model, eps, s) for s in (0, 1, 2)]
            assert row[col] == f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"
        assert row["seeds"] == 3
    agg = aggregate(df, ["test.mean_dice"])
    r = agg[(agg["model"] == "unet") & (agg["epsilon"] == 1.0)].iloc[0]
    vals = [dice_of("unet", 1.0, s) for s in (0, 1, 2)]
    assert r["test.mean_dice.mean"] == pytest.approx(statistics.fmean(vals))
    assert r["test.mean_dice.std"] == pytest.approx(statistics.stdev(vals))
    assert r["test.mean_dice.n"] == 3


def test_per_class_and_formats(store):
    df = load(store)
    pc = summary_table(df, per_class=True)
    assert {"grey_matter", "white_matter", "mean", "ε"} <= set(pc.columns)
    row = pc[(pc["model"] == "unet") & (pc["ε"] == "ε = 8")].iloc[0]
    vals = [dice_of("unet", 8.0, s) - 0.05 for s in (0, 1, 2)]
    assert row["grey_matter"] == f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    md = render(df, "markdown")
    assert md.splitlines()[0] == "| model | non-private | ε = 8 | ε = 1 | seeds |"
    tex = render(df, "latex", caption="toy")
    assert r"\toprule" in tex and r"$\varepsilon$ = 8" in tex and r"$\pm$" in tex
    csv = pd.read_csv(pd.io.common.StringIO(render(df, "csv", per_class=True)))
    assert {"model", "epsilon", "test.mean_dice.mean", "test.dice.grey_matter.std"} <= set(
        csv.columns)


def test_figures_have_labelled_axes_and_files(store, tmp_path):
    from privseg.results.figures import dice_vs_epsilon, dice_vs_width, make_figures

    df = load(store)
    fig = dice_vs_epsilon(df)
    ax = fig.axes[0]
    assert "ε" in ax.get_xlabel() and "Dice" in ax.get_ylabel() and ax.get_title()
    assert any("non-private" in t.get_text() for t in ax.get_xticklabels())
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    # every line and every marker shape is explained (non-private points are squares)
    assert legend == {"unet", "resunet-scalenorm", "● DP-SGD at the target ε",
                      "■ non-private (ε = ∞)"}
    assert "δ = 0.001" in ax.get_xlabel() and "per subject" in ax.get_xlabel()
    assert dice_vs_width(df) is None  # one width only
    out = tmp_path / "figs"
    paths = make_figures(df, out, prefix="toy_")
    names = {p.name for p in paths}
    assert {"toy_dice_vs_epsilon.png", "toy_dice_vs_epsilon.pdf",
            "toy_per_site_dice.png"} <= names
    assert "toy_central_vs_federated.png" not in names  # central only
    assert all(p.stat().st_size > 1000 for p in paths)


def test_width_and_federated_figures(tmp_path):
    from privseg.results.figures import central_vs_federated, dice_vs_width

    for width in [0.5, 1.0, 2.0]:
        for eps in [math.inf, 8.0]:
            for seed in [0, 1]:
                rec = make_record("unet", eps, seed, width=width)
                write_record(tmp_path / rec["run_id"], rec)
    for eps in [math.inf, 8.0]:
        rec = make_record("unet", eps, 0, setting="federated", width=1.0)
        write_record(tmp_path / rec["run_id"], rec)
    df = load(tmp_path)
    fig = dice_vs_width(df[df["setting"] == "central"])
    ax = fig.axes[0]
    assert "width" in ax.get_xlabel() and "Dice" in ax.get_ylabel()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"non-private", "ε = 8"}
    fed = central_vs_federated(df[df["width"] == 1.0])
    assert {t.get_text() for t in fed.axes[-1].get_legend().get_texts()} == {"central",
                                                                              "federated"}
    # over all widths, the widths are panels of their own, never one averaged bar
    assert len(central_vs_federated(df).axes) == 3
    assert [t.get_text() for t in fed.axes[0].get_xticklabels()] == ["non-private", "ε = 8"]
    assert "width" in summary_table(df[df["setting"] == "central"]).columns


def test_reference_round_trip_and_comparison(store, tmp_path):
    from privseg.results.reference import (
        compare,
        per_run_agreement,
        read_reference,
        write_reference,
    )

    df = load(store)
    path = write_reference(df, tmp_path / "ref.csv", command="privseg test", sweep_file=None)
    ref, meta = read_reference(path)
    assert meta["command"] == "privseg test" and "date" in meta and "cpu" in meta["machine"]
    assert len(ref) == 18
    cmp = compare(ref, df)
    assert set(cmp["Δ mean"]) == {"+0.0000"}
    same, n, worst = per_run_agreement(ref, df)
    assert (same, n) == (6, 6) and worst == 0.0  # only the non-private runs must repeat
    assert set(cmp["agrees"]) == {"exact"}


def _store_and_its_reference(store, tmp_path):
    """The store's runs and a reference written from them (as ``--write-reference`` does)."""
    from privseg.results.reference import read_reference, write_reference

    df = load(store)
    ref, meta = read_reference(write_reference(df, tmp_path / "ref.csv", command="c",
                                               sweep_file=None))
    return df, ref, meta


def test_reproduction_text_states_how_close_it_is(store, tmp_path):
    from privseg.results.reference import agreement_text, machine

    df, ref, meta = _store_and_its_reference(store, tmp_path)
    new = df.copy()
    dp = new["private"]
    new.loc[dp, "test.mean_dice"] += 0.002  # fresh secret noise: a small shift of the mean
    text, ok = agreement_text(ref, new, meta)
    assert ok and "reproduce exactly" in text and "within 3 standard errors" in text
    new.loc[~dp & (new["seed"] == 1), "test.mean_dice"] -= 0.05  # 0.7530 vs 0.7064
    text, ok = agreement_text(ref, new, meta)
    assert not ok and "reproduction failure" in text
    other = dict(meta, machine=json.dumps({**machine(), "torch": "0.0"}))
    text, ok = agreement_text(ref, new, other)
    assert "expected to differ slightly" in text and "reproduce exactly" not in text


def test_a_rerun_missing_runs_or_far_off_on_another_machine_does_not_agree(store, tmp_path):
    """What a reviewer's rerun must not pass: no runs at all, only the non-private ones (the
    DP runs failed), or on another machine non-private numbers far off (there they need not
    repeat exactly, but they are held to the standard-error test of the DP cells)."""
    from privseg.results.reference import agreement_text, compare, machine

    df, ref, meta = _store_and_its_reference(store, tmp_path)
    assert agreement_text(ref, df, meta)[1]  # the control: the same runs agree
    text, ok = agreement_text(ref, df.iloc[0:0], meta)
    assert not ok and "18 of the reference's 18 runs are not in the rerun" in text
    only_nonprivate = df[~df["private"]]
    text, ok = agreement_text(ref, only_nonprivate, meta)
    assert not ok and "12 of the reference's 18 runs are not in the rerun" in text
    cells = compare(ref, only_nonprivate)
    assert set(cells[cells["ε"] != "non-private"]["agrees"]) == {"no (not in the rerun)"}
    other = dict(meta, machine=json.dumps({**machine(), "cpu": "another CPU"}))
    off = df.copy()
    off.loc[~off["private"], "test.mean_dice"] -= 0.40
    text, ok = agreement_text(ref, off, other)
    assert not ok and "on another machine the non-private ones too" in text
    assert agreement_text(ref, df, other)[1]


def test_committed_reference_is_from_a_real_run():
    from privseg.results.reference import read_reference, reference_dir, table_entry

    entry = table_entry("table1", quick=True)
    ref, meta = read_reference(reference_dir() / entry["reference"])
    assert meta["command"].startswith("privseg reproduce table1 --quick")
    assert {"date", "machine", "sweep"} <= set(meta)
    assert set(ref["epsilon"]) == {math.inf, 8.0, 3.0, 1.0}
    assert ref.groupby(["model", "epsilon"])["seed"].nunique().eq(3).all()


def test_load_from_wandb_api_object():
    rec = make_record("unet", 8.0, 1)
    run = SimpleNamespace(
        id="abc", name="r", state="finished", config=rec["config"],
        summary={"test/mean_dice": 0.7, "test/dice/grey_matter": 0.6, "privacy/epsilon": 7.9,
                 "privacy/enabled": True, "test/site/site-A/mean_dice": 0.65})
    crashed = SimpleNamespace(id="x", name="x", state="crashed", config=rec["config"],
                              summary={})
    calls = {}

    class Api:
        def runs(self, path, filters=None):
            calls["path"], calls["filters"] = path, filters
            return [run, crashed]

    df = load_wandb("ent/proj/toy", api=Api())
    assert calls == {"path": "ent/proj", "filters": {"group": "toy"}}
    assert len(df) == 1
    r = df.iloc[0]
    assert r["run_id"] == "abc" and r["test.mean_dice"] == 0.7 and r["epsilon"] == 8.0
    assert r["test.dice.grey_matter"] == 0.6 and r["privacy.epsilon"] == 7.9
    assert r["test.site.site-A.mean_dice"] == 0.65 and r["sweep"] == "toy"


def test_table_and_plot_commands(store, tmp_path):
    from typer.testing import CliRunner

    from privseg.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["table", str(store)])
    assert res.exit_code == 0, res.output
    assert "| model | non-private | ε = 8 | ε = 1 | seeds |" in res.output
    res = runner.invoke(app, ["table", str(store), "--format", "latex", "--per-class"])
    assert res.exit_code == 0 and "grey\\_matter" in res.output
    res = runner.invoke(app, ["plot", str(store), "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f" / f"{store.name}_dice_vs_epsilon.pdf").stat().st_size > 1000
    res = runner.invoke(app, ["table", str(tmp_path / "nothing-here")])
    assert res.exit_code != 0


def federated_record(mode: str, seed: int) -> dict:
    """A federated record at ε = 8 with the privacy block the server writes for ``mode``."""
    rec = make_record("unet", 8.0, seed, setting="federated")
    rec["run_id"] = rec["name"] = f"{rec['run_id']}-{mode}"
    rec["test"]["mean_dice"] += 0.1 if mode == "site" else 0.0
    if mode == "sample":
        rec["privacy"] = {
            "enabled": True, "mode": "sample", "unit": "subject", "epsilon": 7.9,
            "epsilon_per_site": {"site-A": 7.9, "site-B": 6.0},
            "delta_per_site": {"site-A": 0.02, "site-B": 0.03},
            "noise_multiplier_per_site": {"site-A": 1.1, "site-B": 1.2},
            "sample_rate_per_site": {"site-A": 0.25, "site-B": 0.2},
            "steps_per_site": {"site-A": 12, "site-B": 8}, "accountant": "prv"}
    else:
        rec["privacy"] = {"enabled": True, "mode": "site", "unit": "site", "epsilon": 7.95,
                          "delta": 0.2, "noise_multiplier": 0.9, "sample_rate": 1.0,
                          "rounds": 15, "rounds_done": 15, "accountant": "prv"}
    return rec


def test_site_level_and_subject_level_dp_are_never_averaged_together(tmp_path):
    """ε per whole site (DP-FedAvg) and ε per subject are different guarantees: a table row or
    figure bar never pools them, and the columns behind each ε are filled."""
    from privseg.results.figures import central_vs_federated, per_site

    for seed in [0, 1]:
        for rec in (make_record("unet", 8.0, seed), federated_record("sample", seed),
                    federated_record("site", seed)):
            write_record(tmp_path / rec["run_id"], rec)
    df = load(tmp_path)
    sample = df[df["privacy.mode"] == "sample"].iloc[0]
    assert (sample["privacy.unit"], sample["setting"]) == ("subject", "federated")
    assert (sample["privacy.delta"], sample["privacy.sigma"], sample["privacy.sample_rate"],
            sample["privacy.steps"]) == (0.02, 1.1, 0.25, 12)  # the worst site's (site-A)
    site = df[df["privacy.mode"] == "site"].iloc[0]
    assert site["setting"] == "federated (site-level DP)" and site["privacy.unit"] == "site"
    assert (site["privacy.delta"], site["privacy.sigma"], site["privacy.steps"]) == (0.2, 0.9, 15)
    # with SecAgg+ the σ behind ε is the effective one (rounding in the sensitivity)
    secure = federated_record("site", 0)
    secure["privacy"].update(noise_multiplier_effective=0.88, secure_aggregation=True)
    assert _accounting_columns(secure["privacy"])["privacy.sigma"] == 0.88

    agg = aggregate(df).set_index("setting")
    assert agg.loc["federated", "test.mean_dice.mean"] == pytest.approx(
        statistics.mean(dice_of("unet", 8.0, s, "federated") for s in [0, 1]))
    assert agg.loc["federated (site-level DP)", "test.mean_dice.mean"] == pytest.approx(
        statistics.mean(dice_of("unet", 8.0, s, "federated") + 0.1 for s in [0, 1]))
    fig = central_vs_federated(df)
    assert {t.get_text() for t in fig.axes[-1].get_legend().get_texts()} == {
        "central", "federated", "federated (site-level DP)"}
    assert "per site for site-level DP" in fig.axes[0].get_xlabel()
    assert {ax.get_title() for ax in per_site(df).axes} == {
        "unet / central", "unet / federated", "unet / federated (site-level DP)"}



def test_table_never_averages_runs_differing_in_more_than_the_seed(tmp_path):
    from typer.testing import CliRunner

    from privseg.cli import app

    for seed, epochs, dice in [(0, 60, 0.30), (0, 2, 0.01)]:
        rec = make_record("unet", 8.0, seed)
        rec["config"]["training"]["epochs"] = epochs
        rec["run_id"] = f"unet-e{epochs}"
        rec["test"]["mean_dice"] = dice
        write_record(tmp_path / rec["run_id"], rec)
    table = summary_table(load(tmp_path))
    assert sorted(table["ε = 8"]) == ["0.010", "0.300"]  # two rows, never 0.155 ± 0.205
    assert sorted(table["variant"]) == ["training.epochs=2", "training.epochs=60"]
    out = CliRunner().invoke(app, ["table", str(tmp_path), "--format", "latex"]).output
    assert "0.155" not in out and "0.010" in out and "0.300" in out
    assert "one seed per cell" in out and r"$\pm$ std" not in out  # no ± claimed for 1 seed


def test_worst_case_hd95_for_a_class_never_predicted():
    import numpy as np
    import torch

    from privseg.training.evaluate import summarise, volume_metrics, worst_case_distance

    target = np.zeros((4, 12, 12), int)
    target[1:3, 2:5, 2:5] = 1
    target[1:3, 7:10, 7:10] = 2
    predicts_both = torch.as_tensor(target.copy())
    predicts_both[1, 7, 7] = 0  # slightly off, so its HD95 is small but not worse than missing
    never_b = predicts_both.clone()
    never_b[never_b == 2] = 0
    names = ["background", "a", "b"]
    good, bad = volume_metrics(predicts_both, target, names), volume_metrics(never_b, target,
                                                                             names)
    assert bad["hd95"]["b"] == worst_case_distance((4, 12, 12)) == math.sqrt(3**2 + 11**2 * 2)
    assert bad["empty_pred"] == {"a": 0, "b": 1}
    s_good, s_bad = summarise({"x": ("s", good)}), summarise({"x": ("s", bad)})
    assert s_bad["mean_hd95"] > s_good["mean_hd95"]  # missing a class is never rewarded
    assert s_bad["n_empty_pred"] == 1 and s_good["n_empty_pred"] == 0
    # a class absent from the reference is skipped by both metrics, whatever is predicted
    absent = target.copy()
    absent[absent == 2] = 0
    m = volume_metrics(predicts_both, absent, names)
    assert math.isnan(m["hd95"]["b"]) and math.isnan(m["dice"]["b"]) and m["empty_pred"]["b"] == 0


def test_released_metrics_are_the_ema_weights_when_kept(tmp_path):
    """An ablation adding EMA compares the weights it releases (the EMA), with each run's worst
    class beside the mean; a run without EMA releases its raw weights."""
    plain = make_record("unet", 8.0, 0)
    averaged = make_record("unet", 8.0, 1)
    averaged["ema"] = {"decay": 0.9, "updates": 10,
                       "test": {"mean_dice": 0.61, "dice": {"grey_matter": 0.52,
                                                            "white_matter": 0.70}},
                       "val": {"mean_dice": 0.66}}
    for rec in (plain, averaged):  # the raw model's validation Dice at the last epoch
        rec["history"] = [{"epoch": 1, "val_mean_dice": 0.1}, {"epoch": 2, "val_mean_dice": 0.3}]
    for rec in (plain, averaged):
        write_record(tmp_path / rec["run_id"], rec)
    df = load(tmp_path).set_index("seed")
    assert df.loc[1, "released.weights"] == "ema"
    assert df.loc[1, "released.mean_dice"] == pytest.approx(0.61)
    assert df.loc[1, "released.dice.grey_matter"] == pytest.approx(0.52)
    assert df.loc[1, "released.min_dice"] == pytest.approx(0.52)
    assert df.loc[1, "ema.test.mean_dice"] == pytest.approx(0.61)
    assert df.loc[1, "released.val_mean_dice"] == pytest.approx(0.66)
    assert df.loc[0, "released.val_mean_dice"] == pytest.approx(0.3)
    assert df.loc[1, "test.mean_dice"] == pytest.approx(plain["test"]["mean_dice"] + 0.01)
    raw = plain["test"]
    assert df.loc[0, "released.weights"] == "raw"
    assert df.loc[0, "released.mean_dice"] == pytest.approx(raw["mean_dice"])
    assert df.loc[0, "released.min_dice"] == pytest.approx(min(raw["dice"].values()))
    assert math.isnan(df.loc[0, "ema.test.mean_dice"])
    table = summary_table(df.reset_index(), "released.mean_dice", per_class=True)
    row = table.iloc[0]
    mean = statistics.fmean([raw["mean_dice"], 0.61])
    sd = statistics.stdev([raw["mean_dice"], 0.61])
    assert row["mean"] == f"{mean:.3f} ± {sd:.3f}"
    worst = [min(raw["dice"].values()), 0.52]
    assert row["min_dice"] == f"{statistics.fmean(worst):.3f} ± {statistics.stdev(worst):.3f}"
    gm = [raw["dice"]["grey_matter"], 0.52]
    assert row["grey_matter"] == f"{statistics.fmean(gm):.3f} ± {statistics.stdev(gm):.3f}"
    csv = pd.read_csv(io.StringIO(
        render(df.reset_index(), "csv", True, "released.mean_dice")))
    assert csv["released.min_dice.mean"].iloc[0] == pytest.approx(statistics.fmean(worst))


def test_privseg_reproduce_exits_1_when_the_rerun_does_not_agree(store, tmp_path, monkeypatch):
    """A reviewer's (or CI's) one command must fail when the numbers do not reproduce, not
    only when a run fails: here the sweep is stubbed to 'rerun' the store, compared once with a
    reference written from it (agrees: 0) and once with the store's Dice shifted (exit 1)."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import privseg.results.reference as reference
    import privseg.sweeps.cli as sweeps_cli
    from privseg.cli import app

    df = load(store)
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    reference.write_reference(df, ref_dir / "t.csv", command="privseg reproduce t --quick",
                              sweep_file=None)
    entry = {"title": "T", "variant": "quick", "sweep": "s.yaml", "reference": "t.csv"}
    outcomes = [SimpleNamespace(run_id=r, status="complete") for r in df["run_id"]]
    result = SimpleNamespace(outcomes=outcomes, output_dir=store, ok=True)
    monkeypatch.setattr(reference, "table_entry", lambda name, quick: entry)
    monkeypatch.setattr(reference, "reference_dir", lambda: ref_dir)
    monkeypatch.setattr(sweeps_cli, "_load", lambda *a: SimpleNamespace(name="s", path=None))
    monkeypatch.setattr(sweeps_cli, "_run_reported", lambda *a: result)
    runner = CliRunner()
    res = runner.invoke(app, ["reproduce", "t", "--quick"])
    assert res.exit_code == 0, res.output
    shifted = df.copy()
    shifted["test.mean_dice"] -= 0.3
    reference.write_reference(shifted, ref_dir / "t.csv", command="c", sweep_file=None)
    res = runner.invoke(app, ["reproduce", "t", "--quick"])
    assert res.exit_code == 1 and "does NOT agree" in res.output
