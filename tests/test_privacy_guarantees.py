"""Privacy guarantees as an adversary would test them: secret noise, site-level accounting.

Each test takes the seat of a party that the record says the guarantee holds against: the
holder of the run config (in a federation, the server that hands it out) must not be able to
regenerate DP noise; a site-level ε must be the accountant's ε of the sampling actually done.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_federated import tiny
from test_train_end_to_end import config as central_config

from privseg.config import parse_config
from privseg.datasets import load_dataset
from privseg.dp.randomness import dp_seed
from privseg.federated.client import SiteClient, get_weights
from privseg.federated.server import SiteClientManager
from privseg.federated.site_dp import PoissonSiteDP, PoissonSiteSampler, seed_server_noise
from privseg.federated.site_plans import site_level_epsilon, site_level_plan
from privseg.federated.sites import build_sites, site_seed
from privseg.run import run

warnings.filterwarnings("ignore", module="opacus")


def _models(tmp: Path, privacy: dict) -> list[dict]:
    """Train one small DP config twice (same seed), return both checkpoints."""
    cfg = central_config(tmp, training={"epochs": 2, "expected_batch_size": 4},
                         model={"options": {"base_channels": 4, "depth": 2}},
                         privacy={"enabled": True, "noise_multiplier": 1.0,
                                  "target_epsilon": None, **privacy})
    out = []
    for _ in range(2):
        rec = run(cfg, progress=False, force=True)
        out.append((rec, torch.load(Path(cfg.output.dir) / rec["run_id"] / "model.pt")))
    return out


def test_dp_noise_is_secret_per_run_unless_a_noise_seed_opts_in(tmp_path):
    (rec1, m1), (rec2, m2) = _models(tmp_path / "secret", {})
    assert any(not torch.equal(m1[k], m2[k]) for k in m1), "same config, same noise"
    assert "secret" in rec1["privacy"]["noise"] and "secret" in rec1["privacy"]["guarantee"]
    (rec3, m3), (rec4, m4) = _models(tmp_path / "seeded", {"noise_seed": 7})
    assert all(torch.equal(m3[k], m4[k]) for k in m3)
    assert rec3["test"]["dice"] == rec4["test"]["dice"]
    assert "not a private release" in rec3["privacy"]["noise"]
    assert "replays the noise" in rec3["privacy"]["guarantee"]


def _flat_noise(params, std: float, generator: torch.Generator) -> torch.Tensor:
    """The noise FlatDPOptimizer draws for one step from ``generator`` (Opacus' order)."""
    return torch.cat([torch.normal(0.0, std, size=p.shape, generator=generator).flatten()
                      for p in params])


def _one_site_step(tmp: Path, **privacy) -> tuple[SiteClient, torch.Tensor, torch.Tensor]:
    """Site A's first DP step in sample mode: (client, clipped sum, clipped sum + noise)."""
    d = tiny(tmp)
    d["privacy"].pop("noise_seed")
    d["privacy"].update(privacy)
    cfg = parse_config(d)
    ss = load_dataset("phantom", cfg.dataset.options, None, cfg.dataset.cache_dir)
    sites, _ = build_sites(cfg, ss)
    client = SiteClient(cfg, sites["site-A"], ss)
    opt = client.state.optimizer
    steps, add_noise = [], opt.add_noise

    def spy():  # what only the site sees: its clipped sum before the noise
        clipped = opt._summed.clone()
        add_noise()
        steps.append((clipped, opt._flat_grad.clone()))

    opt.add_noise = spy
    client.fit(get_weights(client.state.model), {})
    clipped, noisy = steps[0]
    return client, clipped, noisy


def _replay_error(client: SiteClient, clipped: torch.Tensor, noisy: torch.Tensor,
                  seeds: list[int]) -> float:
    """The config holder's best try: the clipped sum recovered as noisy − regenerated noise,
    over every seed it can derive; its error relative to the true noise's norm."""
    opt = client.state.optimizer
    std = opt.noise_multiplier * opt.max_grad_norm
    true_noise = (noisy - clipped).norm()
    errors = [float((noisy - _flat_noise(opt.params, std, torch.Generator().manual_seed(s))
                     - clipped).norm() / true_noise) for s in seeds]
    return min(errors)


def test_the_server_cannot_replay_a_sites_noise_from_the_config(tmp_path):
    client, clipped, noisy = _one_site_step(tmp_path)
    cfg = client.cfg
    s = site_seed(cfg.seed, "site-A")
    # every seed a config holder can derive: privseg's old seeding (the site's seed + 1), the
    # run seed, and the opt-in derivation applied to the config's own numbers
    seeds = [s + 1, s, cfg.seed, cfg.seed + 1, dp_seed(cfg.seed, "noise", s),
             dp_seed(0, "noise", s)]
    assert _replay_error(client, clipped, noisy, seeds) > 0.9  # no better than ignoring it
    # control: with privacy.noise_seed the same attack recovers the clipped sum exactly
    client, clipped, noisy = _one_site_step(tmp_path / "seeded", noise_seed=0)
    assert _replay_error(client, clipped, noisy, [dp_seed(0, "noise", s)]) < 1e-5


def _server_noise(cfg, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The noise the server adds in site-level DP (a round's noisy sum of no update)."""
    seed_server_noise(cfg)
    d = site_level_plan(cfg, 3)
    strategy = PoissonSiteDP(None, d["noise_multiplier"], d["clipping_norm"], 1.0)
    strategy.current = [np.zeros_like(a) for a in arrays]
    return strategy.noisy_mean_update([])


def test_the_config_holder_cannot_replay_the_servers_site_level_noise(tmp_path):
    arrays = [np.zeros((64, 8), np.float32), np.zeros(16, np.float32)]
    d = tiny(tmp_path, dp_mode="site")
    d["privacy"].pop("noise_seed")
    cfg = parse_config(d)
    noise = np.concatenate([a.ravel() for a in _server_noise(cfg, arrays)])
    std = site_level_plan(cfg, 3)["noise_multiplier"] * cfg.setting.federated.site_clip_norm
    for seed in (cfg.seed, dp_seed(cfg.seed, "server-noise", cfg.seed) % 2**32):
        np.random.seed(seed)  # privseg's old seeding of the server's noise, and a guess
        guess = np.concatenate([np.random.normal(0, std, a.shape).astype(a.dtype).ravel()
                                for a in arrays])
        assert np.linalg.norm(noise - guess) > 0.9 * np.linalg.norm(noise)
    # control: an opted-in noise seed is replayable by design
    d["privacy"]["noise_seed"] = 5
    cfg = parse_config(d)
    noise = np.concatenate([a.ravel() for a in _server_noise(cfg, arrays)])
    np.random.seed(dp_seed(5, "server-noise", cfg.seed) % 2**32)
    guess = np.concatenate([np.random.normal(0, std, a.shape).astype(a.dtype).ravel()
                            for a in arrays])
    assert np.allclose(noise, guess)


def test_a_deployed_server_refuses_noise_replayable_from_the_config(monkeypatch, tmp_path):
    """Over the legacy transport a site never sees the server's config, so only the server can
    refuse a ``privacy.noise_seed`` that would make its site-level noise and site coins
    replayable by whoever holds the config; the operator's opt-in lets a loopback test run."""
    import privseg.federated.deploy as deploy

    reached = []

    def make_server(cfg, n_sites):
        reached.append(cfg.privacy.noise_seed)
        raise RuntimeError("make_server was reached")

    monkeypatch.setattr(deploy, "make_server", make_server)
    replayable = parse_config(tiny(tmp_path, dp_mode="site"))  # noise_seed 0
    with pytest.raises(ValueError, match="server: refusing a config with privacy.noise_seed"):
        deploy.run_server(replayable, "127.0.0.1:1", 3)
    assert reached == []
    with pytest.raises(RuntimeError, match="make_server was reached"):
        deploy.run_server(replayable, "127.0.0.1:1", 3, allow_reproducible_noise=True)
    d = tiny(tmp_path, dp_mode="site")
    d["privacy"].pop("noise_seed")
    with pytest.raises(RuntimeError, match="make_server was reached"):
        deploy.run_server(parse_config(d), "127.0.0.1:1", 3)  # secret noise: served
    assert reached == [0, None]


def test_sites_are_poisson_sampled_and_an_empty_round_still_releases_noise():
    sampler = PoissonSiteSampler(0.3, seed=11)
    names = [f"site-{i}" for i in range(10)]
    counts = [len(sampler.draw(names)) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(3.0, abs=0.15)  # q·N
    assert len(set(counts)) > 4 and 0 in counts  # not a fixed m; empty rounds happen
    manager = SiteClientManager(10, seed=0, poisson=sampler)
    assert manager.poisson is sampler
    strategy = PoissonSiteDP(None, 1.0, 1.0, 3.0)
    strategy.current = [np.zeros(100, np.float32)]
    np.random.seed(0)
    released = strategy.noisy_mean_update([])[0]
    assert released.std() == pytest.approx(1.0 / 3.0, rel=0.25)  # σC / (q·N)


@pytest.mark.parametrize("fraction,n_sites", [(1.0, 3), (0.5, 10), (0.25, 8)])
def test_site_level_epsilon_equals_dp_accounting_pld(tmp_path, fraction, n_sites):
    """The record's scheme (Poisson site sampling at q, or every site: q = 1) accounted by
    Google's dp_accounting PLD; privseg's PRV ε within 1% (and never below by more than
    PRV's stated error)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    d = tiny(tmp_path, dp_mode="site", fraction_fit=fraction, rounds=30)
    d["privacy"]["accountant"] = "prv"
    plan = site_level_plan(parse_config(d), n_sites)
    eps = site_level_epsilon(plan["noise_multiplier"], fraction, 30, plan["delta"], "prv")
    event = dp_event.GaussianDpEvent(plan["noise_multiplier"])
    if fraction < 1:
        event = dp_event.PoissonSampledDpEvent(fraction, event)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(event, 30)
    ref = acc.get_epsilon(plan["delta"])
    assert eps == pytest.approx(ref, rel=0.01)
    assert eps <= 8.0


def test_secure_aggregation_accounts_secaggs_rounding_in_the_sensitivity(tmp_path):
    """SecAgg+ rounds each coordinate of a site's clipped message stochastically to a grid of
    step 2R/Q: one site moves the unmasked sum by up to C + √d·2R/Q, not C (2% more for a
    30M-parameter model at the default R = 8, Q = 2^22). σ is calibrated for that sensitivity,
    so ε at the effective σ (dp_accounting's PLD of the Gaussian composed over the rounds)
    stays at the target; accounting at σ alone, as before, reports less than was spent."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    d = tiny(tmp_path, dp_mode="site", secure_aggregation=True, rounds=30)
    d["privacy"].update(accountant="prv", target_epsilon=4.0)
    cfg = parse_config(d)
    with pytest.raises(ValueError, match="needs the model's size"):
        site_level_plan(cfg, 3)
    size = 30_000_000
    plan = site_level_plan(cfg, 3, size)
    rounding = math.sqrt(size) * 2 * 8.0 / 2**22
    assert plan["secagg_rounding_bound"] == pytest.approx(rounding) and rounding > 0.02
    assert plan["sensitivity"] == pytest.approx(1.0 + rounding)
    sigma, effective = plan["noise_multiplier"], plan["noise_multiplier_effective"]
    assert sigma * 1.0 == pytest.approx(effective * (1.0 + rounding), rel=1e-12)  # σC = z·S

    def pld(z):
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_event.GaussianDpEvent(z), 30)
        return acc.get_epsilon(plan["delta"])

    eps = site_level_epsilon(effective, 1.0, 30, plan["delta"], "prv")
    assert eps <= 4.0 and eps == pytest.approx(pld(effective), rel=0.01)
    assert pld(sigma) < 0.98 * pld(effective)  # σ alone: optimistic by over 2%
    plain = parse_config(tiny(tmp_path, dp_mode="site", rounds=30))
    assert site_level_plan(plain, 3, size)["sensitivity"] == 1.0  # no SecAgg+: C alone


def test_ghost_clipping_trains_through_empty_poisson_batches(tmp_path):
    """q = 1/28: about a third of the steps sample no subject (they crashed ghost mode)."""
    cfg = central_config(tmp_path, dataset={"options": {"n_subjects": 40, "size": 32}},
                         model={"options": {"base_channels": 4, "depth": 2}},
                         training={"epochs": 2, "expected_batch_size": 1,
                                   "physical_batch_size": 1, "crops_per_subject": 1},
                         privacy={"enabled": True, "target_epsilon": 8.0,
                                  "grad_sample_mode": "ghost"})
    rec = run(cfg, progress=False)
    p = rec["privacy"]
    assert p["sample_rate"] == pytest.approx(1 / len(rec["splits"]["train"]))
    assert p["steps"] == rec["timing"]["steps"] == 2 * len(rec["splits"]["train"])
    assert 0 < p["epsilon"] <= 8.0


def test_the_wire_audit_checks_what_a_metric_says_not_only_its_type(tmp_path):
    from privseg.federated.server import RecordingStrategy

    rec = RecordingStrategy(parse_config(tiny(tmp_path)), 3)
    rec.properties = {s: {"class_names": "background,csf"} for s in ("site-A", "site-B",
                                                                       "site-C")}
    rec._check_metrics({"site": "site-A", "split": "val", "dice_sum/csf": 1.5,
                        "n_subjects": 3})
    assert rec.audit["violations"] == []
    rec._check_metrics({"site": "patient-017"})
    rec._check_metrics({"split": b"\x00\x01"})
    assert len(rec.audit["violations"]) == 2
    # a metric's name is the site's choice too: only names a site sends pass
    rec._check_metrics({"dice_sum/patient-017-csf": 1.5})
    rec._check_metrics({"n": 3})
    assert len(rec.audit["violations"]) == 4
    assert "'dice_sum/patient-017-csf'" in rec.audit["violations"][2]
    rec.site_of = {"7": "site-A"}  # connection 7 is site-A's
    on_7 = type("Proxy", (), {"cid": "7"})()
    reply = type("Reply", (), {})
    honest, forged = reply(), reply()
    honest.metrics, forged.metrics = {"site": "site-A"}, {"site": "site-B"}
    kept, left_out = rec._genuine([(on_7, honest)])
    assert kept == [(on_7, honest)] and left_out == {} and len(rec.audit["violations"]) == 4
    kept, left_out = rec._genuine([(on_7, forged)])
    assert kept == [] and left_out == {"site-A": "its reply named site 'site-B': left out"}
    assert "names site 'site-B'" in rec.audit["violations"][-1]


def test_a_site_cannot_have_its_reply_recorded_as_another_sites(monkeypatch, tmp_path):
    """site-C's reply names site-A (its metrics claim ε = 0.001): it is left out as a failed
    site's, named missed with why; site-A's own ε stays its own, not the forged one."""
    fit = SiteClient.fit

    def forging(self, parameters, config):
        weights, n, metrics = fit(self, parameters, config)
        if self.site == "site-C":
            metrics = {**metrics, "site": "site-A", "epsilon": 0.001}
        return weights, n, metrics

    monkeypatch.setattr(SiteClient, "fit", forging)
    from privseg.federated.simulation import run_federated

    d = tiny(tmp_path, rounds=1, min_fit_sites=2, eval_every=0)
    rec = run_federated(parse_config(d), progress=False, force=True)
    (row,) = rec["history"]
    assert row["sites"] == ["site-A", "site-B"]
    assert row["missed"] == [{"site": "site-C",
                              "reason": "its reply named site 'site-A': left out"}]
    assert rec["privacy"]["epsilon_reported_per_site"]["site-A"] > 1  # its own report
    assert "names site 'site-A'" in " ".join(rec["federated"]["wire_audit"]["violations"])


def test_flowers_workflow_refuses_sampled_site_dp_whose_empty_rounds_it_would_skip(tmp_path):
    from privseg.config import ConfigError
    from privseg.federated.secagg import refuse_sampled_site_dp

    refuse_sampled_site_dp(parse_config(tiny(tmp_path, dp_mode="site", fraction_fit=1.0)))
    with pytest.raises(ConfigError, match="fraction_fit"):
        refuse_sampled_site_dp(parse_config(tiny(tmp_path, dp_mode="site", fraction_fit=0.5)))


def test_an_empty_poisson_round_in_the_simulation_still_moves_the_model(tmp_path):
    """Site coins that draw nobody: the server still releases global + noise/(q·N)."""
    from privseg.federated.simulation import simulate

    d = tiny(tmp_path, dp_mode="site", fraction_fit=0.01, rounds=1, local_steps=1,
             eval_every=0)
    cfg = parse_config(d)
    ss = load_dataset("phantom", cfg.dataset.options, None, cfg.dataset.cache_dir)
    from privseg.federated.server import initial_model_weights

    server, proxies, _ = simulate(cfg, ss)
    assert server.recorder.rounds[0]["sites"] == []  # q = 0.01: (almost surely) nobody
    from flwr.common import parameters_to_ndarrays

    first = initial_model_weights(cfg, ss.in_channels, ss.num_classes, (1, 16, 16))
    final = parameters_to_ndarrays(server.parameters)
    assert any(not np.array_equal(a, b) for a, b in zip(first, final, strict=True))
    assert server.record()["privacy"]["rounds_done"] == 1


def _mt_words(g: torch.Generator) -> np.ndarray:
    from privseg.dp.randomness import _MT_OFFSET, _MT_WORDS

    state = g.get_state().numpy()
    return state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)


def test_a_secret_cpu_generator_is_not_any_32_bit_seed():
    """torch's CPU generator keeps only 32 bits of a manual_seed (2^32 seeds: searchable). A
    seeded state is MT19937's init_genrand(seed): word i+1 follows from word i. The secret
    generator's words are OS entropy, so no 32-bit seed yields them."""
    from privseg.dp.randomness import dp_generator, secret_cpu_generator

    def follows(words: np.ndarray) -> bool:  # init_genrand's recurrence, on the first words
        w = [int(x) for x in words[:4]]
        return all(w[i + 1] == (1812433253 * (w[i] ^ (w[i] >> 30)) + i + 1) & 0xFFFFFFFF
                   for i in range(3))

    seeded = torch.Generator().manual_seed(2**40 + 12345)
    assert _mt_words(seeded)[0] == 12345 and follows(_mt_words(seeded))  # the layout we fill
    a, b = secret_cpu_generator(), dp_generator(None, "noise", 0)
    assert not follows(_mt_words(a)) and not follows(_mt_words(b))
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


def test_a_site_silent_in_a_secagg_round_stops_the_run_instead_of_under_noising_it(
        tmp_path, monkeypatch):
    """Flower's SecAgg+ workflow drops a site that never answers without reporting a failure;
    the mean of the others would carry noise σC/N sized for all N sites."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from test_federated import _secagg_sites, secagg_tiny

    import privseg.federated.secagg as secagg

    class SilentSiteGrid(secagg.InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            silent = min(m.metadata.dst_node_id for m in messages)
            keep = []
            for m in messages:
                stage = m.content.config_records.get(RECORD_KEY_CONFIGS)
                if (m.metadata.dst_node_id == silent and stage is not None
                        and stage.get(Key.STAGE) == "collect_masked_vectors"):
                    continue  # never answers: no reply, no error
                keep.append(m)
            return super().push_messages(keep)

    monkeypatch.setattr(secagg, "InProcessGrid", SilentSiteGrid)
    cfg = parse_config(secagg_tiny(tmp_path, sigma=None, eval_every=0, rounds=1,
                                   local_steps=1))
    _, clients = _secagg_sites(cfg)
    with pytest.raises(RuntimeError, match="only 2 of 3 sites"):
        secagg.simulate_secagg(cfg, clients)
