"""A deployed site's worker never lets a run's privacy accountant start again from zero.

The worker keeps each Flower run's SiteClient (model, DP optimizer, accountant) in memory. If
that state were lost mid-run (the worker restarted, or the run dropped to make room for newer
runs), a fresh SiteClient would count the run's DP steps from zero: the site would report less
ε than it spent and could train past the steps its σ was calibrated for.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_federated import tiny

from privseg.config import parse_config
from privseg.dp.accounting import epsilon_of_history
from privseg.dp.ledger import AlreadyCharged, BudgetExceeded, SiteLedger, Spend
from privseg.federated.app import CONFIG_KEY
from privseg.federated.client import get_weights
from privseg.federated.supernode import SiteWorker, ledger_path, trained_runs_path

warnings.filterwarnings("ignore", module="opacus")
SITE = "site-A"


def deployable(tmp) -> dict:
    """The tiny federation as a deployed site accepts it: no replayable noise seed."""
    d = tiny(tmp)
    d["privacy"].pop("noise_seed")
    return d


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return parse_config(deployable(tmp_path_factory.mktemp("worker")))


def context(cfg, run_id: int) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(),
                   run_config={CONFIG_KEY: json.dumps(cfg.model_dump(mode="json"))})


def train_once(worker: SiteWorker, cfg, run_id: int) -> dict:
    client = worker._site_run(context(cfg, run_id), spends=True).client
    return client.fit(get_weights(client.state.model), {})[2]


def test_a_run_dropped_after_training_is_refused_not_restarted(cfg):
    worker = SiteWorker.load([cfg], SITE)
    worker.keep_runs = 2
    first = train_once(worker, cfg, 101)
    assert first["steps"] == 2
    kept = worker.runs[101].client
    worker._site_run(context(cfg, 102))  # joins, never trains: dropped first
    worker._site_run(context(cfg, 103))
    assert worker._site_run(context(cfg, 101)).client is kept
    train_once(worker, cfg, 104)
    train_once(worker, cfg, 105)  # no untrained run left to drop: 101 goes
    assert 101 not in worker.runs
    with pytest.raises(RuntimeError, match="under-report"):
        worker._site_run(context(cfg, 101), spends=True)


def test_a_restarted_worker_refuses_runs_it_trained_in_before(cfg):
    worker = SiteWorker.load([cfg], SITE)
    train_once(worker, cfg, 201)
    assert "201" in trained_runs_path(SITE).read_text().split()
    restarted = SiteWorker.load([cfg], SITE)
    with pytest.raises(RuntimeError, match="under-report"):
        restarted._site_run(context(cfg, 201))
    assert train_once(restarted, cfg, 202)["steps"] == 2  # a new run is served


def test_a_run_charged_by_another_worker_or_before_a_crash_is_refused(cfg):
    """One charge pays for one training in a run: a second worker on the same site state (its
    trained-runs list read before the first worker trained), or this worker restarted after a
    crash between the ledger's line and the trained-runs line, holds no accountant for the run
    and would train in it from zero, unseen by the ledger."""
    first = SiteWorker.load([cfg], SITE)
    second = SiteWorker.load([cfg], SITE)
    assert train_once(first, cfg, 501)["steps"] == 2
    with pytest.raises(AlreadyCharged, match="run 501"):
        second._site_run(context(cfg, 501), spends=True)

    crashing = SiteWorker.load([cfg], SITE)

    def killed(run_id):
        raise SystemExit("the site died after the ledger's fsync")

    crashing.trained.add = killed
    with pytest.raises(SystemExit):
        crashing._site_run(context(cfg, 502), spends=True)
    restarted = SiteWorker.load([cfg], SITE)
    assert 502 not in restarted.trained
    with pytest.raises(AlreadyCharged, match="run 502"):
        restarted._site_run(context(cfg, 502), spends=True)
    runs = [e["run_id"] for e in SiteLedger(ledger_path(SITE)).entries]
    assert runs.count("501") == 1 and runs.count("502") == 1


def test_the_ledger_charges_a_run_once_and_refuses_it_again(tmp_path):
    ledger = SiteLedger(tmp_path / "l.jsonl")
    spend = Spend(1.0, 0.1, 10, 1e-5)
    total = ledger.charge(7, "a", spend)
    with pytest.raises(AlreadyCharged):
        ledger.charge(7, "a", spend)
    with pytest.raises(AlreadyCharged):
        SiteLedger(tmp_path / "l.jsonl").charge("7", "b", Spend(0.5, 0.2, 99, 1e-5))
    again = SiteLedger(tmp_path / "l.jsonl")
    assert len(again.entries) == 1 and again.spent() == pytest.approx(total)


@pytest.mark.parametrize("dp_mode", ["sample", "svt", "site", "none"])
def test_a_site_trains_no_more_rounds_than_the_run_has_and_never_sends_its_weights(
        tmp_path, dp_mode):
    """What a site is charged for (its plan; its ledger's rounds × ε per round in svt mode,
    rounds in site mode) is one training answer per round. A server asking for more, with a new
    round number or global model each time, is refused once the run's rounds are answered; an
    instruction resent unchanged gets the same reply, not a new release. Nor does the site send
    its locally trained model on request (Flower's legacy ``get_parameters``), which in svt and
    site mode no DP covers."""
    d = deployable(tmp_path)
    d["setting"]["federated"].update(dp_mode=dp_mode, rounds=2)
    if dp_mode == "svt":
        d["setting"]["federated"]["share_fraction"] = 0.1
    d["privacy"]["enabled"] = dp_mode != "none"
    cfg = parse_config(d)
    client = SiteWorker.load([cfg], SITE)._site_run(context(cfg, 601), spends=True).client
    start = get_weights(client.state.model)
    model = [w.copy() for w in start]
    first = client.fit(model, {"round": 1})
    assert client.fit(model, {"round": 1}) is first  # resent unchanged: answered from cache
    with pytest.raises(RuntimeError, match="refusing to send its model weights"):
        client.get_parameters({})
    nudged = [w + 1e-3 if w.dtype.kind == "f" else w for w in start]
    client.fit(nudged, {"round": 1})  # the same round with another model: a second answer
    for instruction in ((model, {"round": 2}), (start, {"round": 3})):
        with pytest.raises(RuntimeError, match="answered all 2 rounds"):
            client.fit(*instruction)
    assert client.rounds_done == 2 and client.steps_done == 4


def message(run_id: int, message_type: str) -> Message:
    """A message as the SuperLink would deliver it for ``run_id`` (Flower takes the sender's
    identity from TaskIdentity, set here as the ServerApp's runtime sets it)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    try:
        return Message(RecordDict(), dst_node_id=1, message_type=message_type)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_a_training_message_is_recorded_before_it_is_answered(cfg):
    worker = SiteWorker.load([cfg], SITE)
    ctx = context(cfg, 301)
    worker.handle(message(301, MessageType.QUERY), ctx)
    assert 301 in worker.runs and 301 not in worker.trained
    # an empty train message fails in the ClientApp, after the run was recorded
    worker.handle(message(301, MessageType.TRAIN), ctx)
    assert 301 in worker.trained
    assert "301" in trained_runs_path(SITE).read_text().split()


def test_a_site_refuses_a_config_whose_noise_is_replayable(tmp_path):
    replayable = parse_config(tiny(tmp_path))  # privacy.noise_seed set
    with pytest.raises(ValueError, match="noise_seed"):
        SiteWorker.load([replayable], SITE)
    SiteWorker.load([replayable], SITE, allow_reproducible_noise=True)  # the operator's opt-in


def test_the_ledger_composes_runs_and_refuses_the_one_past_the_budget(tmp_path):
    cfg = parse_config(deployable(tmp_path))
    probe = SiteWorker.load([cfg], SITE)
    plan = probe._site_run(context(cfg, 1)).client.plan  # joins; nothing trains or is charged
    one = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    e2, e3 = (epsilon_of_history(one * k, 1e-5) for k in (2, 3))
    budget = (e2 + e3) / 2  # room for two runs on this site's data, not three

    worker = SiteWorker.load([cfg], SITE, budget_epsilon=budget)
    train_once(worker, cfg, 401)
    train_once(worker, cfg, 402)
    with pytest.raises(BudgetExceeded) as refused:
        worker._site_run(context(cfg, 403), spends=True)
    text = str(refused.value)
    assert f"ε = {budget:g}" in text and "2 earlier run(s)" in text
    assert f"{e2:.4g}" in text and f"{e3:.4g}" in text  # the spend so far and with this run
    assert 403 not in worker.trained  # refused before training

    # the refusal reaches the server as the site's error reply
    reply = worker.handle(message(404, MessageType.TRAIN), context(cfg, 404))
    assert reply.has_error() and "privacy budget" in reply.error.reason
    # ... without the site's folders (the ledger's path names its user's home)
    assert "(ledger <path at the site>)" in reply.error.reason
    assert str(ledger_path(SITE).parent) not in reply.error.reason

    restarted = SiteWorker.load([cfg], SITE, budget_epsilon=budget)
    with pytest.raises(BudgetExceeded):
        restarted._site_run(context(cfg, 405), spends=True)
    ledger = SiteLedger(ledger_path(SITE))
    assert [e["run_id"] for e in ledger.entries] == ["401", "402"]
    assert ledger.spent() == pytest.approx(e2)
    assert "composed: ε = " in ledger.report()


def test_a_non_private_run_spends_everything_and_is_refused_under_any_budget(tmp_path):
    from privseg.dp.ledger import Spend

    nonprivate = Spend(0.0, 1.0, 1, 0.0, "none")
    with pytest.raises(BudgetExceeded, match="composed total to inf"):
        SiteLedger(tmp_path / "l.jsonl", budget_epsilon=1e6).charge(1, "a", nonprivate)
    open_ledger = SiteLedger(tmp_path / "l.jsonl")  # no budget: recorded, total ∞
    open_ledger.charge(2, "a", Spend(1.0, 0.1, 10, 1e-5))
    assert 0 < open_ledger.spent() < 10
    open_ledger.charge(3, "a", nonprivate)
    assert SiteLedger(tmp_path / "l.jsonl").spent() == float("inf")


def test_two_workers_on_one_ledger_cannot_both_spend_the_same_room(tmp_path):
    """Each charge locks the file and reads it again, so the second sees the first's run."""
    from privseg.dp.ledger import Spend

    run = Spend(1.0, 0.1, 50, 1e-5)
    one = SiteLedger(tmp_path / "l.jsonl").spent(run)
    two = epsilon_of_history(run.history() * 2, 1e-5)
    budget = (one + two) / 2  # room for one such run, not two
    a = SiteLedger(tmp_path / "l.jsonl", budget_epsilon=budget)
    b = SiteLedger(tmp_path / "l.jsonl", budget_epsilon=budget)  # opened before a charges
    a.charge(1, "x", run)
    with pytest.raises(BudgetExceeded):
        b.charge(2, "x", run)
    assert [e["run_id"] for e in SiteLedger(tmp_path / "l.jsonl").entries] == ["1"]


def test_a_config_naming_another_cache_dir_finds_the_same_ledger(tmp_path):
    """The budget is the site's, not a config's: a second run under a config that moves
    ``dataset.cache_dir`` (or any other machine-local path) composes with the first."""
    cfg = parse_config(deployable(tmp_path))
    elsewhere = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(
        update={"cache_dir": str(tmp_path / "another-cache")})})
    probe = SiteWorker.load([cfg], SITE)
    plan = probe._site_run(context(cfg, 1)).client.plan
    one = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    budget = (epsilon_of_history(one, 1e-5) + epsilon_of_history(one * 2, 1e-5)) / 2

    train_once(SiteWorker.load([cfg], SITE, budget_epsilon=budget), cfg, 501)
    moved = SiteWorker.load([elsewhere], SITE, budget_epsilon=budget)
    with pytest.raises(BudgetExceeded):
        moved._site_run(context(elsewhere, 502), spends=True)
    assert ledger_path(SITE) == ledger_path(SITE, tmp_path / "site-state")  # conftest's env


def test_a_ledger_left_beside_the_data_cache_stops_the_site(tmp_path):
    from privseg.config import ConfigError

    cfg = parse_config(deployable(tmp_path))
    old = Path(cfg.dataset.cache_dir) / "site-ledger" / f"{SITE}.jsonl"
    old.parent.mkdir(parents=True)
    old.write_text('{"run_id": "1"}\n')
    with pytest.raises(ConfigError, match="site-ledger"):
        SiteWorker.load([cfg], SITE)
    ledger_path(SITE).parent.mkdir(parents=True)
    ledger_path(SITE).write_text("")  # moved (here: a fresh one chosen by the operator)
    SiteWorker.load([cfg], SITE)


def svt_deployable(tmp, eps: float) -> dict:
    """An SVT run (2 rounds, so ε/2 per round) as a deployed site accepts it."""
    d = tiny(tmp, dp_mode="svt", share_fraction=0.1)
    d["privacy"]["target_epsilon"] = eps
    d["privacy"].pop("noise_seed")
    return d


def test_an_svt_run_is_charged_its_pure_epsilon_composed_with_gaussian_runs(tmp_path):
    """A DP-SGD run, then an SVT run (ε 6 = 2 rounds × 3, δ 0) on the same site's data: the
    ledger's total is the Gaussian run's ε plus 6 (basic composition, see privseg.dp.ledger);
    a second SVT run would take it past a budget with room for one, and is refused."""
    gauss, svt = parse_config(deployable(tmp_path)), parse_config(svt_deployable(tmp_path, 6.0))
    probe = SiteWorker.load([gauss], SITE)
    plan = probe._site_run(context(gauss, 1)).client.plan
    e_gauss = epsilon_of_history([(plan.noise_multiplier, plan.sample_rate, plan.steps)], 1e-5)
    budget = e_gauss + 6.0 + 3.0  # room for one SVT run after the Gaussian one, not two

    worker = SiteWorker.load([gauss, svt], SITE, budget_epsilon=budget)
    train_once(worker, gauss, 501)
    train_once(worker, svt, 502)  # its sparse message is the SiteClient's fit result
    ledger = SiteLedger(ledger_path(SITE))
    entry = ledger.entries[-1]
    assert entry["run_id"] == "502" and entry["delta"] == 0.0 and entry["steps"] == 0
    assert entry["epsilon_per_round"] == pytest.approx(3.0) and entry["pure_rounds"] == 2
    assert entry["epsilon"] == pytest.approx(6.0) and "local DP" in ledger.report()
    assert ledger.spent() == pytest.approx(e_gauss + 6.0, rel=1e-3)  # PRV's own tolerance

    with pytest.raises(BudgetExceeded) as refused:
        worker._site_run(context(svt, 503), spends=True)
    assert "2 earlier run(s)" in str(refused.value)
    assert f"composed total to {e_gauss + 12.0:.4g}" in str(refused.value)
    assert 503 not in worker.trained
    assert [e["run_id"] for e in SiteLedger(ledger_path(SITE)).entries] == ["501", "502"]


def test_pure_epsilon_spends_add_and_an_infinite_one_is_refused(tmp_path):
    from privseg.dp.ledger import Spend

    ledger = SiteLedger(tmp_path / "l.jsonl", budget_epsilon=10.0)
    ledger.charge(1, "a", Spend.pure(2.0, 3))
    assert ledger.charge(2, "a", Spend.pure(1.0, 4)) == pytest.approx(10.0)  # 6 + 4
    with pytest.raises(BudgetExceeded, match="composed total to 10.5"):
        ledger.charge(3, "a", Spend.pure(0.5, 1))
    with pytest.raises(BudgetExceeded, match="composed total to inf"):
        SiteLedger(tmp_path / "m.jsonl", budget_epsilon=1e9).charge(
            1, "a", Spend.pure(float("inf"), 2))
    with pytest.raises(ValueError, match="rounds"):
        Spend.pure(1.0, 0)


def test_a_site_level_run_is_refused_under_a_budget_unless_the_server_is_trusted(tmp_path):
    """Site-level DP: the server adds the noise to raw updates it has seen, so against the
    server the site's subjects have ε = ∞; a budget holds against everyone unless the operator
    says it trusts the server, and the report says which parties the total holds against."""
    from privseg.dp.ledger import Spend

    site_level = Spend(1.2, 1.0, 5, 1e-5, "site")
    strict = SiteLedger(tmp_path / "l.jsonl", budget_epsilon=1e6)
    with pytest.raises(BudgetExceeded, match="raw updates"):
        strict.charge(1, "a", site_level)
    assert strict.entries == []
    trusting = SiteLedger(tmp_path / "l.jsonl", budget_epsilon=1e6, trusted_server=True)
    trusting.charge(1, "a", site_level)
    report = SiteLedger(tmp_path / "l.jsonl").report()
    assert "against the server: ε = ∞" in report and "released models only" in report
    subject = SiteLedger(tmp_path / "s.jsonl", budget_epsilon=1e6)
    subject.charge(2, "a", Spend(1.2, 0.1, 5, 1e-5))
    assert "against everyone outside the site" in subject.report()
    assert "against the server: ε = ∞" not in subject.report()


def test_a_secure_aggregation_run_is_charged_at_the_sigma_its_rounding_leaves(tmp_path):
    """SecAgg+'s rounding raises a site's sensitivity above C (privseg.federated.site_plans):
    the site's ledger charges the run at the effective σ the server's record accounts, not at
    the σ Flower's wrapper scales by C (which would charge less than the run spends)."""
    from privseg.federated.site_plans import site_level_plan

    d = deployable(tmp_path)
    d["dataset"]["options"]["n_subjects"] = 17
    d["setting"]["federated"].update(dp_mode="site", secure_aggregation=True)
    cfg = parse_config(d)
    worker = SiteWorker.load([cfg], SITE, budget_epsilon=1e6, trust_server=True)
    client = worker._site_run(context(cfg, 701), spends=True).client
    plan = site_level_plan(cfg, 3, sum(w.size for w in get_weights(client.state.model)))
    (entry,) = SiteLedger(ledger_path(SITE)).entries
    assert entry["unit"] == "site" and entry["steps"] == plan["rounds"]
    assert entry["noise_multiplier"] == plan["noise_multiplier_effective"]
    assert plan["noise_multiplier_effective"] < plan["noise_multiplier"]


def test_an_error_the_server_reads_names_no_path_at_the_site():
    from privseg.federated.supernode import without_local_paths

    text = ("refused (ledger /home/dr.jane-doe/.local/state/privseg/site-ledger/site-A.jsonl); "
            "listed in /srv/x/site-runs/site-A.runs, not ./relative or C/nan, q = 1/2, σ/ε")
    assert without_local_paths(text) == (
        "refused (ledger <path at the site>); listed in <path at the site>, not ./relative or "
        "C/nan, q = 1/2, σ/ε")


def test_a_site_scores_a_bounded_number_of_models_on_its_held_out_subjects(tmp_path):
    """Held-out metrics are outside every DP guarantee: a server could otherwise have any
    number of models of its choosing scored on a site's validation and test subjects. A site
    answers one validation per round of the run and one final test, and a resent instruction
    with the same reply."""
    cfg = parse_config(deployable(tmp_path))  # 2 rounds
    client = SiteWorker.load([cfg], SITE)._site_run(context(cfg, 801)).client
    start = get_weights(client.state.model)
    models = [[w + k * 1e-3 if w.dtype.kind == "f" else w for w in start] for k in range(3)]
    first = client.evaluate(models[0], {"split": "val", "round": 1})
    assert client.evaluate(models[0], {"split": "val", "round": 1}) is first  # resent
    client.evaluate(models[1], {"split": "val", "round": 2})
    with pytest.raises(RuntimeError, match="has answered 2 val evaluation"):
        client.evaluate(models[2], {"split": "val", "round": 2})
    test = client.evaluate(models[1], {"split": "test", "round": 2})
    assert client.evaluate(models[1], {"split": "test", "round": 2}) is test
    for other in (models[0], models[2]):
        with pytest.raises(RuntimeError, match="has answered 1 test evaluation"):
            client.evaluate(other, {"split": "test", "round": 2})
    with pytest.raises(ValueError, match="no evaluation split 'train'"):
        client.evaluate(models[0], {"split": "train"})


def test_runs_that_only_score_models_are_charged_and_cannot_come_back(tmp_path):
    """The cap on scorings is per run, and a run costs a server nothing to start: a run's first
    evaluation is charged to the ledger like its first training (a site not yet drawn to train
    is charged early, never less), so runs that only score models on the held-out subjects
    spend the site's budget, and a dropped one is refused, not scored afresh."""
    cfg = parse_config(deployable(tmp_path))
    probe = SiteWorker.load([cfg], SITE)
    plan = probe._site_run(context(cfg, 1)).client.plan  # joins; nothing is charged
    one = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    budget = (epsilon_of_history(one * 2, 1e-5) + epsilon_of_history(one * 3, 1e-5)) / 2
    worker = SiteWorker.load([cfg], SITE, budget_epsilon=budget)
    worker.keep_runs = 1
    for run_id in (901, 902):
        reply = worker.handle(message(run_id, MessageType.EVALUATE), context(cfg, run_id))
        assert reply.has_error()  # an empty message fails in the ClientApp, after the charge
    assert [e["run_id"] for e in SiteLedger(ledger_path(SITE)).entries] == ["901", "902"]
    assert 901 not in worker.runs  # dropped for 902
    back = worker.handle(message(901, MessageType.EVALUATE), context(cfg, 901))
    assert back.has_error() and "holds no state" in back.error.reason
    third = worker.handle(message(903, MessageType.EVALUATE), context(cfg, 903))
    assert third.has_error() and "privacy budget" in third.error.reason
    assert worker.handle(message(904, MessageType.QUERY), context(cfg, 904)).has_error() \
        or 904 not in worker.trained  # a query (properties) is never charged
    assert 904 not in worker.trained


def test_a_site_loads_privseg_s_clientapp_from_its_install_never_a_bundle_s(tmp_path,
                                                                              monkeypatch):
    """The loader a privseg SuperNode's ClientApp process uses (the end-to-end case, an
    operator's own bundle refused at every site, is in tests/test_federated_superlink.py)."""
    import subprocess
    import sys

    from flwr.clientapp.client_app import LoadClientAppError

    import privseg.federated.pinned_clientapp as pinned
    from privseg.federated.app import client_app

    ours = (Path(pinned.__file__).parent / "flower_app" / "pyproject.toml").read_text()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    monkeypatch.setattr("flwr.common.config.get_project_dir", lambda *a: bundle)
    load = pinned.pinned_load_client_app_fn("", None, True)
    (bundle / "pyproject.toml").write_text(ours)
    assert load("privseg/privseg-federated", "0.1.0", "hash") is client_app
    (bundle / "pyproject.toml").write_text(
        ours.replace(pinned.CLIENTAPP_REF, "operator_code.client:client_app"))
    with pytest.raises(LoadClientAppError, match="names 'operator_code.client:client_app'"):
        load("privseg/privseg-federated", "0.1.0", "hash")
    (bundle / "pyproject.toml").write_text("[tool.flwr")
    with pytest.raises(LoadClientAppError, match="names none"):
        load("privseg/privseg-federated", "0.1.0", "hash")
    shim = pinned.install_shim(tmp_path) / "flwr-clientapp"
    assert shim.stat().st_mode & 0o777 == 0o700
    assert shim.read_text().startswith(f"#!{sys.executable}\n")
    res = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Run a Flower ClientApp" in res.stdout
