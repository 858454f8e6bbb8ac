"""One-run privacy audit (Steinke et al. 2023): the bound's math, the canaries, the audit run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from scipy import stats

from privseg.audit import run_audit, with_audit
from privseg.config import load_config
from privseg.dp.audit import epsilon_lower_bound, guess_and_count, p_value
from privseg.dp.canaries import GradientCanaries
from privseg.dp.optimizer import FlatDPOptimizer
from privseg.federated.site_canaries import SiteUpdateCanaries
from privseg.federated.site_dp import PoissonSiteDP
from privseg.results.audit_figure import claimed_vs_audited
from privseg.results.audit_report import audit_verdict
from privseg.results.store import frame
from privseg.results.tables import summary_table
from privseg.run import run

# --- the bound -----------------------------------------------------------------------------

def test_all_correct_matches_the_binomial_tail_in_closed_form():
    # δ = 0, v = r: p-value = q^r with q = e^ε/(1+e^ε); the bound solves q^r = 0.05.
    q = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)
    assert epsilon_lower_bound(1000, 1000, 0.0) == pytest.approx(5.809, abs=1e-3)


def test_delta_term_is_kept_and_lowers_the_bound():
    # r = v = m = 2, ε = 0: tail 1/4; δ term 2mδ·max(P[B=1]/1, P[0<=B<2]/2) = 4δ·max(.5, .375)
    assert p_value(2, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 4 * 0.01 * 0.5)
    assert p_value(2, 2, 2, 0.0, 0.0) == pytest.approx(0.25)
    with_delta = epsilon_lower_bound(1000, 1000, 1e-5, m=1000)
    assert with_delta < epsilon_lower_bound(1000, 1000, 0.0) - 0.01
    assert with_delta > 5.7
    # a large δ·m makes any outcome consistent with DP
    assert epsilon_lower_bound(200, 190, 0.02, m=1000) == 0.0


def test_chance_level_guessing_gives_zero_and_bound_is_the_rejection_edge():
    assert epsilon_lower_bound(1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound(200, 100, 0.0) == 0.0
    eps = epsilon_lower_bound(200, 170, 0.0)
    tail = lambda e: stats.binom.sf(169, 200, 1 / (1 + math.exp(-e)))  # noqa: E731
    assert tail(eps) < 0.05 < tail(eps + 1e-3)
    assert 0.5 < eps < 3


def test_guesses_count_top_in_and_bottom_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, True, False])
    assert guess_and_count(scores, included, 2, 2) == (4, 2)  # in: 5 y, 4 n; out: 0 y, 1 n
    assert guess_and_count(scores, included, 1, 0) == (1, 1)


# --- gradient canaries go through the optimizer's clipping and noise -------------------------

def _toy_canaries(clipping: bool, steps: int = 20):
    torch.manual_seed(0)
    model = GradSampleModule(torch.nn.Linear(4, 50))
    opt = FlatDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                          max_grad_norm=0.5, expected_batch_size=3)
    included = np.arange(100) % 2 == 0
    can = GradientCanaries(opt, included, sample_rate=0.5, clipping=clipping)
    for _ in range(steps):
        (model(torch.randn(3, 4)) * 0).sum().backward()  # real gradients all zero
        opt.step()
        opt.zero_grad()
    return can, included


@pytest.mark.parametrize("clipping", [True, False])
def test_gradient_canaries_add_a_clipped_dirac_when_sampled(clipping):
    can, included = _toy_canaries(clipping)
    per_sample = 0.5 if clipping else 0.5 * 10.0  # canary gradient is 10 C before clipping
    assert can.steps == 20
    assert np.allclose(can.scores, per_sample * can.times_sampled, atol=1e-5)
    assert can.times_sampled[~included].sum() == 0
    assert 0 < can.times_sampled[included].mean() < 20


# --- the audit run ---------------------------------------------------------------------------

def _cfg(tmp, eps: float, epochs: int = 10, audit: dict | None = None, **extra):
    sets = ["dataset.options={n_subjects: 40, size: 32, n_sites: 1}",
            f"dataset.cache_dir={tmp / 'cache'}", "dataset.val_fraction=0",
            "dataset.test_fraction=0.1", "model.options={base_channels: 4, depth: 2}",
            f"training.epochs={epochs}", "training.expected_batch_size=8",
            "training.physical_batch_size=16", "training.crops_per_subject=1",
            "training.device=cpu", "tracking.wandb=off", f"output.dir={tmp / 'runs'}",
            f"privacy.target_epsilon={eps}", "privacy.delta=1e-5"]
    cfg = load_config("phantom2d", sets + [f"{k}={v}" for k, v in extra.items()])
    return with_audit(cfg, **(audit or {}))


def _fed_cfg(tmp, eps: float, dp_mode: str, audit: dict | None = None):
    rounds = ("{rounds: 5, local_epochs: 2" if dp_mode == "sample" else
              "{rounds: 10, local_epochs: null, local_steps: 1")
    return _cfg(tmp, eps, audit=audit, **{
        "dataset.options": "{n_subjects: 40, size: 32, n_sites: 2}",
        "setting.kind": "federated",
        "setting.federated": f"{rounds}, dp_mode: {dp_mode}, eval_every: 0}}"})


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


@pytest.mark.parametrize("fault", [{"noise_fraction": 0.1}, {"clipping": False}],
                         ids=["sigma/10", "no-clipping"])
def test_broken_mechanism_is_caught(tmp, one_thread, fault):
    rec = run_audit(_cfg(tmp, 1.0, audit={"canaries": 1000, **fault}), progress=False)
    a = rec["audit"]
    assert rec["privacy"]["epsilon"] <= 1.0 + 1e-6  # the claim is unchanged
    assert a["epsilon_lower"] > 1.0, a
    assert a["flagged"]


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_correct_run_is_not_flagged(tmp, one_thread, eps):
    rec = run_audit(_cfg(tmp, eps, audit={"canaries": 1000}), progress=False)
    a = rec["audit"]
    assert a["canaries_m"] == 1000 and a["guesses_r"] == 200
    assert 0 <= a["epsilon_lower"] <= rec["privacy"]["epsilon"] <= eps + 1e-6
    assert not a["flagged"]
    df = frame([rec, {"config": {}, "privacy": {"enabled": False}}])
    assert df["audit.epsilon_lower"].iloc[0] == a["epsilon_lower"] or \
        df["audit.epsilon_lower"].iloc[1] == a["epsilon_lower"]
    assert df["audit.epsilon_lower"].isna().sum() == 1
    assert claimed_vs_audited(df) is not None
    assert claimed_vs_audited(df[df["audit.epsilon_lower"].isna()]) is None


def test_input_canaries_are_trained_on_and_bound_stays_below_claim(tmp, one_thread):
    rec = run_audit(_cfg(tmp, 8.0, epochs=3, audit={"kind": "input", "canaries": 40}),
                    progress=False)
    a = rec["audit"]
    n_train = 36  # 40 subjects, 10% test
    assert rec["privacy"]["n_subjects"] == n_train + a["canaries_in"]
    assert 0 <= a["epsilon_lower"] <= rec["privacy"]["epsilon"]


def test_non_private_and_unsupported_federated_configs_are_refused(tmp):
    with pytest.raises(ValueError, match="privacy.enabled"):
        run_audit(_cfg(tmp, 1.0, **{"privacy.enabled": "false"}))
    with pytest.raises(ValueError, match="audit.kind=input with setting.federated.dp_mode=site"):
        run_audit(_fed_cfg(tmp, 1.0, "site", audit={"kind": "input"}))
    with pytest.raises(ValueError, match="clipping=false with setting.federated.dp_mode=site"):
        run_audit(_fed_cfg(tmp, 1.0, "site", audit={"clipping": False}))
    with pytest.raises(ValueError, match="kind"):
        with_audit(_cfg(tmp, 1.0), kind="bogus")


# --- the audit as a run config section: sweeps, run ids, tables -------------------------------

def test_audit_section_keeps_run_ids_and_run_dispatches_to_the_audit(tmp, one_thread):
    cfg = _cfg(tmp, 8.0, epochs=2, audit={"canaries": 50})
    plain = cfg.model_copy(update={"audit": None})
    assert "audit" not in plain.model_dump(mode="json", exclude_none=True)
    assert cfg.run_id() == f"{plain.run_id()}-audit-gradient-m50"
    assert with_audit(cfg, noise_fraction=0.5).run_id() == f"{plain.run_id()}-audit-gradient-" \
        "m50-noise0.5"
    rec = run(cfg, progress=False)  # what the sweep worker calls
    assert rec["run_id"] == cfg.run_id() and rec["audit"]["canaries_m"] == 50
    assert (tmp / "runs" / cfg.run_id() / "record.json").is_file()


def _fake_audit(cfg, kind: str, noise: float, low: float) -> dict:
    cfg = with_audit(cfg, kind=kind, noise_fraction=noise)
    return {"status": "complete", "run_id": cfg.run_id(), "setting": "central",
            "config": cfg.model_dump(mode="json"),
            "privacy": {"enabled": True, "epsilon": 0.99, "delta": 1e-5},
            "audit": {"kind": kind, "canaries_m": cfg.audit.canaries_m(), "epsilon_lower": low,
                      "guesses_r": 20, "correct_v": 15,
                      "fault": {"noise_fraction": noise, "clipping": True}}}


def test_table_keeps_canary_kinds_and_broken_runs_apart(tmp):
    cfg = _cfg(tmp, 1.0)
    recs = [_fake_audit(cfg, "gradient", 1.0, 0.3), _fake_audit(cfg, "input", 1.0, 0.0),
            _fake_audit(cfg, "gradient", 0.1, 2.5)]
    table = summary_table(frame(recs), "audit.epsilon_lower")
    assert len(table) == 3
    cells = dict(zip(zip(table["audit.kind"], table["audit.fault"], strict=True), table["ε = 1"],
                     strict=True))
    assert cells == {("gradient", "none"): "0.300", ("input", "none"): "0.000",
                     ("gradient", "noise0.1"): "2.500"}


def test_reproduction_verdict_checks_the_invariant(tmp):
    cfg = _cfg(tmp, 1.0)
    good = [_fake_audit(cfg, "gradient", 1.0, 0.3), _fake_audit(cfg, "gradient", 0.1, 2.5)]
    assert audit_verdict(frame(good))[1]
    leaky = [_fake_audit(cfg, "gradient", 1.0, 1.3), _fake_audit(cfg, "gradient", 0.1, 2.5)]
    assert not audit_verdict(frame(leaky))[1]
    missed = [_fake_audit(cfg, "gradient", 1.0, 0.3), _fake_audit(cfg, "gradient", 0.1, 0.5)]
    assert not audit_verdict(frame(missed))[1]


# --- federated: canaries inside one site (sample-level), canary site updates (site-level) ----

class _Inner:
    def configure_fit(self, server_round, parameters, client_manager):
        return []


def test_canary_site_updates_join_the_clipped_sum_before_the_noise():
    dp = PoissonSiteDP(_Inner(), noise_multiplier=0.0, clipping_norm=2.0, denominator=4.0)
    dp.current = [np.zeros((5, 10), np.float32), np.zeros(40, np.float32)]
    included = np.arange(60) % 3 == 0
    can = SiteUpdateCanaries(dp, included, sample_rate=0.5, noise_fraction=0.25)
    real = [np.full((5, 10), 3.0, np.float32),
            np.zeros(40, np.float32)]  # norm > C: clipped to C, spread over 50 values
    for _ in range(12):
        dp.noisy_mean_update([[a.copy() for a in real]])
        assert dp.noise_multiplier == 0.0  # restored after each release
    assert can.rounds == 12 and can.times_sampled[~included].sum() == 0
    assert 0 < can.times_sampled[included].mean() < 12
    real_part = np.where(can.coords < 50, 2.0 / np.sqrt(50) / 4.0 * 12, 0.0)
    assert np.allclose(can.scores, 2.0 / 4.0 * can.times_sampled + real_part, atol=1e-5)


@pytest.mark.parametrize("dp_mode", ["sample", "site"])
def test_federated_audit_correct_run_stays_below_its_claim(tmp, one_thread, dp_mode):
    rec = run_audit(_fed_cfg(tmp, 1.0, dp_mode, audit={"canaries": 1000}), progress=False)
    a = rec["audit"]
    assert rec["setting"] == "federated" and rec["privacy"]["mode"] == dp_mode
    assert 0 <= a["epsilon_lower"] <= rec["privacy"]["epsilon"] <= 1.0 + 1e-6, a
    if dp_mode == "sample":
        assert a["site"] == rec["privacy"]["audited_site"] == "site-A"
    else:
        assert a["rounds_observed"] == 10 and rec["privacy"]["unit"] == "site"


@pytest.mark.parametrize("dp_mode", ["sample", "site"])
def test_federated_audit_catches_a_tenth_of_the_noise(tmp, one_thread, dp_mode):
    rec = run_audit(_fed_cfg(tmp, 1.0, dp_mode, audit={"canaries": 1000,
                                                       "noise_fraction": 0.1}),
                    progress=False)
    assert rec["privacy"]["epsilon"] <= 1.0 + 1e-6
    assert rec["audit"]["epsilon_lower"] > 1.0, rec["audit"]


def test_a_gradient_audit_runs_on_a_model_with_book_kept_layers(monkeypatch, tmp_path):
    """The shipped phantom2d U-Net book-keeps its widest convolutions (their per-sample
    gradients are never instantiated); the canaries' rows are appended to instantiated ones,
    so a book-kept layer's are instantiated for the audit (it stopped on a TypeError)."""
    import privseg.dp.grad_samplers as samplers

    kept = []
    defer = samplers.defer_weight

    def counting(layer, positions):
        kept.append(defer(layer, positions))
        return kept[-1]

    monkeypatch.setattr(samplers, "defer_weight", counting)
    cfg = _cfg(tmp_path, 8.0, epochs=1, audit={"canaries": 100},
               **{"model.options": "{base_channels: 16, depth: 4}"})
    a = run_audit(cfg, progress=False)["audit"]
    assert any(kept)  # the path under test: some layers were book-kept
    assert a["canaries_m"] == 100 and a["guesses_r"] > 0
    assert 0 <= a["epsilon_lower"] <= a["epsilon_claimed"] and not a["flagged"]


def test_privseg_audit_fails_when_the_bound_exceeds_the_claim_unless_the_fault_was_asked(
        monkeypatch):
    """A lower bound above the reported ε is a privacy failure the exit status must carry (a
    sweep or CI reads it); a deliberate fault (--noise-fraction) is expected to be caught."""
    from typer.testing import CliRunner

    import privseg.audit
    import privseg.audit_cli
    from privseg.cli import app

    # the CLI's log set-up (privseg's logger stops propagating) would outlive this test
    monkeypatch.setattr(privseg.audit_cli, "show_info_logs", lambda: None)

    def audited(lower):
        def fake(cfg, progress=True, force=False):
            return {"run_id": "r", "audit": {
                "kind": "gradient", "canaries_m": 100, "guesses_r": 20, "correct_v": 19,
                "epsilon_lower": lower, "confidence": 0.95, "epsilon_claimed": 8.0,
                "delta": 1e-5, "canaries_in": 50, "flagged": lower > 8.0}}
        return fake

    runner = CliRunner()
    monkeypatch.setattr(privseg.audit, "run_audit", audited(9.0))
    res = runner.invoke(app, ["audit", "phantom2d", "-m", "100", "--no-progress"])
    assert res.exit_code == 1 and "exceeds the reported ε" in res.output
    res = runner.invoke(app, ["audit", "phantom2d", "-m", "100", "--no-progress",
                              "--noise-fraction", "0.1"])
    assert res.exit_code == 0 and "ABOVE THE CLAIM" in res.output
    monkeypatch.setattr(privseg.audit, "run_audit", audited(1.0))
    assert runner.invoke(app, ["audit", "phantom2d", "-m", "100", "--no-progress"]).exit_code == 0


def test_the_audited_run_trains_on_the_items_privseg_train_would(monkeypatch, tmp_path):
    """The audit trains the same pieces as ``privseg train``: with ``training.augment`` on, the
    same augmented views (it built plain crops before)."""
    import privseg.audit

    seen = {}

    def stop(cfg, model, train_set, device, **kwargs):
        seen["augment"] = train_set.augment
        raise RuntimeError("stopped after the training items were built")

    monkeypatch.setattr(privseg.audit, "prepare_training", stop)
    cfg = _cfg(tmp_path, 8.0, epochs=1, audit={"canaries": 100},
               **{"training.augment": "{flip: true, intensity: 0.1}"})
    with pytest.raises(RuntimeError, match="stopped after"):
        run_audit(cfg, progress=False)
    assert seen["augment"] is not None
