"""Selective parameter sharing with the sparse vector technique (dp_mode svt) and partial
sharing without DP: the mechanism's noise scales and clipping, its accounting in the record,
what crosses the wire, and equality with FedAvg when the budget is infinite."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_federated import tiny

from privseg.config import parse_config
from privseg.dp.svt import SVTBudget, advanced_composition, svt_budget, svt_select
from privseg.federated.client import SiteClient
from privseg.federated.simulation import run_federated
from privseg.federated.sparse import SiteSparsifier, check_sparse, flatten

warnings.filterwarnings("ignore", module="opacus")


# -- the mechanism --------------------------------------------------------------------------
def test_budget_split_follows_lyu_su_li():
    b = svt_budget(3.0, c=50, gamma=0.01, release_share=0.4)
    assert b.eps1 + b.eps2 + b.eps3 == pytest.approx(3.0)
    assert b.eps3 == pytest.approx(1.2)
    assert b.eps2 / b.eps1 == pytest.approx(100 ** (2 / 3))  # 1 : (2c)^(2/3)
    assert b.threshold_scale == pytest.approx(0.01 / b.eps1)
    assert b.query_scale == pytest.approx(2 * 50 * 0.01 / b.eps2)
    assert b.release_scale == pytest.approx(2 * 50 * 0.01 / 1.2)


def test_release_is_clipped_before_its_noise_at_the_split_scale():
    """Every coordinate far outside [-γ, γ]: the released values centre on ±γ (clipped
    first), and their spread is Lap(2cγ/ε3) (mean |noise| = b, variance 2b²)."""
    d, gamma = 20_000, 0.01
    b = SVTBudget(math.inf, math.inf, math.inf, 4000.0, d, gamma)  # release_scale 0.1
    rng = np.random.default_rng(1)
    u = rng.choice([-10.0, 10.0], size=d)
    rel = svt_select(u, b, threshold=0.0, rng=rng)
    assert rel.indices.size == d  # no selection noise, every |clip(u)| = γ >= 0
    noise = rel.values - gamma * np.sign(u[rel.indices])
    assert abs(noise.mean()) < 0.01
    assert np.abs(noise).mean() == pytest.approx(b.release_scale, rel=0.04)
    assert noise.var() == pytest.approx(2 * b.release_scale ** 2, rel=0.08)


def test_query_noise_has_the_split_scale():
    """With ρ = 0 and u = 0, a query is ⊤ iff ν ≥ τ: P = ½·exp(−τ/b). At τ = b: 0.184
    (a scale of cΔ/ε2, the monotonic one, would give 0.068)."""
    d = 40_000
    b = SVTBudget(math.inf, math.inf, 2.0, math.inf, d, 1.0)  # query scale 2d/2 = d
    tau = 2 * d * 1.0 / 2.0  # 2cΔ/ε2, computed here, not by the code under test
    rel = svt_select(np.zeros(d), b, threshold=tau, rng=np.random.default_rng(2))
    assert rel.indices.size / d == pytest.approx(0.5 / math.e, abs=0.01)


def test_threshold_noise_has_the_split_scale():
    """One query |u| = 0.5 against τ + ρ with ρ ~ Lap(γ/ε1) = Lap(0.5): ⊤ with
    probability 1 − ½e^(−1) = 0.816 (a scale of 2γ/ε1 would give 0.697)."""
    b = SVTBudget(math.inf, 2.0, math.inf, math.inf, 1, 1.0)
    rng = np.random.default_rng(3)
    hits = [svt_select(np.array([0.5]), b, 0.0, rng).indices.size for _ in range(4000)]
    assert np.mean(hits) == pytest.approx(1 - 0.5 / math.e, abs=0.02)


def test_svt_stops_after_c_positives_and_counts_queries():
    u = np.array([0.0, 0.5, 0.0, 0.7, 0.9, 0.0, 0.6, 0.0])
    b = SVTBudget(math.inf, math.inf, math.inf, math.inf, 2, 1.0)
    rel = svt_select(u, b, threshold=0.3, rng=np.random.default_rng(4))
    order = np.random.default_rng(4).permutation(u.size)  # the query order it drew
    positives = [i for i in order if u[i] >= 0.3]
    assert rel.indices.tolist() == sorted(positives[:2])
    assert rel.queries == list(order).index(positives[1]) + 1
    np.testing.assert_array_equal(rel.values, u[rel.indices])


def test_wire_check_flags_a_dense_or_oversized_message():
    dtypes = [np.dtype(np.float32)]
    ok = [np.array([1, 4], np.uint32), np.array([0.1, 0.2], np.float32)]
    assert check_sparse(ok, 10, 2, exact=False, dtypes=dtypes) == []
    assert check_sparse([np.zeros(10, np.float32)], 10, 2, False, dtypes)
    big = [np.arange(3, dtype=np.uint32), np.zeros(3, np.float32)]
    assert check_sparse(big, 10, 2, exact=False, dtypes=dtypes)
    unsorted = [np.array([4, 1], np.uint32), np.zeros(2, np.float32)]
    assert check_sparse(unsorted, 10, 2, exact=False, dtypes=dtypes)


# -- in a federation ------------------------------------------------------------------------
def svt_cfg(tmp: Path, eps: float, **fed) -> dict:
    c = tiny(tmp, dp_mode="svt", **fed)
    c["privacy"]["target_epsilon"] = eps
    return c


@pytest.fixture
def sent(monkeypatch) -> list[tuple[list, list, list, dict]]:
    """Every (global model, site's new model, message sent, metrics) of a site's fit."""
    out: list = []
    fit = SiteClient.fit

    def spy(self, parameters, config):
        inner = self.sparsifier.message

        def message(current, new):
            res = inner(current, new)
            out.append([list(current), list(new), *res])
            return res

        self.sparsifier.message = message
        try:
            res = fit(self, parameters, config)
        finally:
            del self.sparsifier.message
        assert res[0] is out[-1][2]  # what the site returned is the sparse message
        return res

    monkeypatch.setattr(SiteClient, "fit", spy)
    return out


def test_svt_message_holds_only_clipped_selected_coordinates(tmp_path, sent):
    gamma = 2e-4
    cfg = parse_config(svt_cfg(tmp_path, math.inf, share_fraction=0.1, svt_clip=gamma,
                               svt_threshold=0.0))
    rec = run_federated(cfg, progress=False, force=True)
    d = rec["federated"]["sparse"]["d"]
    c = math.ceil(0.1 * d)
    assert len(sent) == 6 and rec["federated"]["wire_audit"]["violations"] == []
    moved_beyond = 0
    for current, new, msg, metrics in sent:
        assert len(msg) == 2  # indices and values, nothing dense
        idx, values = msg
        assert idx.size == metrics["svt_selected"] <= c
        base = flatten(current)
        step = values.astype(np.float64) - base[idx]
        # clipped to [-γ, γ] (no noise at ε = ∞), up to float32 rounding of the weights
        assert np.all(np.abs(step) <= gamma + 1e-6)
        moved_beyond += int(np.sum(np.abs(flatten(new) - base)[idx] > 2 * gamma))
    assert moved_beyond > 0  # the sites' raw updates did exceed γ: the clip acted


def test_svt_record_epsilon_and_bytes(tmp_path):
    rounds, eps = 2, 6.0
    rec = run_federated(parse_config(svt_cfg(tmp_path, eps, share_fraction=0.1,
                                             rounds=rounds, eval_every=0)),
                        progress=False, force=True)
    p = rec["privacy"]
    assert p["mode"] == "svt" and "local DP" in p["unit"] and p["delta"] == 0.0
    assert p["epsilon_per_round"] == pytest.approx(eps / rounds)
    assert p["eps1_threshold"] + p["eps2_queries"] + p["eps3_release"] == pytest.approx(
        eps / rounds)
    assert p["epsilon"] == pytest.approx(eps) and p["rounds_done"] == rounds
    e = eps / rounds
    assert p["epsilon_advanced"] == pytest.approx(
        e * math.sqrt(2 * rounds * math.log(1e5)) + rounds * e * (math.exp(e) - 1))
    assert p["release_scale"] == pytest.approx(2 * p["c"] * p["clip_gamma"] / p["eps3_release"])
    fed = rec["federated"]
    sparse = fed["sparse"]
    # bytes up: each site sends ≤ c (uint32 index + float32 value) and two .npy headers
    for row in fed["bytes_per_round"]:
        assert row["up"] <= row["sites"] * (8 * p["c"] + 2 * 160)
    assert sparse["bytes_ratio"] < 0.25 and sparse["dense_bytes_up_per_site"] == (
        fed["parameter_payload_bytes"])


def test_svt_without_noise_at_fraction_one_equals_fedavg(tmp_path):
    svt = run_federated(parse_config(svt_cfg(tmp_path / "svt", math.inf, share_fraction=1.0,
                                             svt_clip=1e9, svt_threshold=0.0)),
                        progress=False, force=True)
    avg = run_federated(parse_config(tiny(tmp_path / "avg", dp_mode="none")),
                        progress=False, force=True)
    assert svt["test"]["dice"] == avg["test"]["dice"]
    for a, b in zip(svt["history"], avg["history"], strict=True):
        assert a["val_per_site"] == b["val_per_site"]


def test_topk_sharing_sends_exactly_the_largest_updates(tmp_path, sent):
    cfg = parse_config(tiny(tmp_path, dp_mode="none", share_fraction=0.05, rounds=1))
    rec = run_federated(cfg, progress=False, force=True)
    assert rec["federated"]["wire_audit"]["violations"] == []
    for current, new, (idx, values), metrics in sent:
        base, target = flatten(current), flatten(new)
        k = metrics["shared"]
        assert idx.size == k == math.ceil(0.05 * base.size)
        np.testing.assert_array_equal(values, target[idx].astype(np.float32))
        update = np.abs(target - base)
        # the unsent coordinates' updates are no larger than the smallest one sent
        assert update[idx].min() >= np.delete(update, idx).max() > 0


def test_svt_config_checks():
    with pytest.raises(ValueError, match="share_rule"):
        parse_config(svt_cfg(Path("/tmp"), 1.0, share_rule="random"))
    with pytest.raises(ValueError, match="target_epsilon"):
        parse_config(svt_cfg(Path("/tmp"), None))
    assert parse_config(tiny(Path("/tmp"), dp_mode="none")).run_id() == parse_config(
        tiny(Path("/tmp"), dp_mode="none", share_fraction=1.0, svt_clip=1e-3)).run_id()


def test_advanced_composition_formula():
    assert advanced_composition(0.1, 100, 1e-5) == pytest.approx(
        0.1 * math.sqrt(200 * math.log(1e5)) + 100 * 0.1 * math.expm1(0.1))
    assert advanced_composition(5e4, 10, 1e-5) == math.inf  # no overflow at NVFlare-sized ε


def test_svt_noise_is_secret_per_run_unless_a_noise_seed_opts_in():
    current = [np.zeros(500, np.float32)]
    new = [np.linspace(-1e-3, 1e-3, 500).astype(np.float32)]

    def messages(noise_seed):
        d = svt_cfg(Path("/tmp"), 50.0, share_fraction=0.1)
        d["privacy"]["noise_seed"] = noise_seed
        cfg = parse_config(d)
        return [SiteSparsifier(cfg, "a", 1).message(current, new)[0] for _ in range(2)]

    secret = messages(None)
    assert not np.array_equal(secret[0][1], secret[1][1])
    seeded = messages(3)
    for a, b in zip(*seeded, strict=True):
        np.testing.assert_array_equal(a, b)
