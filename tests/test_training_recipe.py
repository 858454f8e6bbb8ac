"""The DP training recipe's pieces: weight averaging, augmentations, lr schedule (issue 17).

Each piece is post-processing or changes what one subject's gradient is, never the mechanism:
the accountant's numbers (σ, q, steps, ε) must be those of the same run without it.
"""

import pytest
import torch
from spine_helpers import TINY_PHANTOM, tiny_config

from privseg.architectures import build
from privseg.datasets import load_dataset
from privseg.run import run as run_training
from privseg.training.evaluate import evaluate

ACCOUNTANT_KEYS = ("noise_multiplier", "sample_rate", "steps", "epsilon", "delta")


def _dp_config(tmp_path, **training):
    return tiny_config(
        tmp_path,
        training={"epochs": 2, "lr": 0.01, **training},
        privacy={"target_epsilon": 8.0, "noise_seed": 3},
    )


def _accounting(record: dict) -> dict:
    return {k: record["privacy"][k] for k in ACCOUNTANT_KEYS}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    return tmp, run_training(_dp_config(tmp), progress=False)


def _load(tmp_path, record, checkpoint):
    ss = load_dataset("phantom", TINY_PHANTOM, None, tmp_path / "cache")
    model = build("unet", 2, 1, ss.num_classes, base_channels=4, depth=2)
    out = tmp_path / "runs" / record["run_id"]
    model.load_state_dict(torch.load(out / checkpoint, weights_only=True))
    return model, ss


def test_ema_is_evaluated_checkpointed_and_free_in_privacy(baseline, one_thread):
    tmp, base = baseline
    rec = run_training(_dp_config(tmp, ema=0.9, polyak_epochs=1), progress=False)
    assert rec["run_id"] != base["run_id"]
    # post-processing: the mechanism and the raw model are those of the run without it
    assert _accounting(rec) == _accounting(base)
    assert rec["privacy"]["accountant_history"] == base["privacy"]["accountant_history"]
    assert rec["test"]["dice"] == base["test"]["dice"]
    raw, ss = _load(tmp, rec, rec["checkpoint"])
    for name in ("ema", "polyak"):
        averaged, _ = _load(tmp, rec, rec[name]["checkpoint"])
        diff = max(float((a - b).abs().max()) for a, b in
                   zip(averaged.state_dict().values(), raw.state_dict().values(), strict=True))
        assert diff > 1e-6, f"{name} weights equal the raw weights"
        test = [s for s in ss.subjects if s.subject_id in set(rec["splits"]["test"])]
        again = evaluate(averaged, test, 2, (1, 16, 16), ss.class_names, torch.device("cpu"))
        assert again["dice"] == rec[name]["test"]["dice"]  # the record evaluates these weights
        assert again["dice"] != rec["test"]["dice"]  # ... which the raw weights' do not match
        val = [s for s in ss.subjects if s.subject_id in set(rec["splits"]["val"])]
        assert val, "the tiny phantom's split has validation subjects"
        on_val = evaluate(averaged, val, 2, (1, 16, 16), ss.class_names, torch.device("cpu"))
        assert on_val["dice"] == rec[name]["val"]["dice"]  # selection reads these weights' val
        assert rec[name]["updates"] > 0
    steps = rec["privacy"]["steps"]
    assert rec["ema"]["updates"] == steps
    assert rec["polyak"]["updates"] == steps // 2  # the last of 2 epochs


def test_ema_needs_a_central_run(tmp_path):
    from privseg.config import ConfigError

    with pytest.raises(ConfigError, match="training.ema"):
        tiny_config(tmp_path, training={"ema": 0.99},
                    setting={"kind": "federated", "federated": {"dp_mode": "sample"}})
    with pytest.raises(ConfigError, match="polyak_epochs"):
        tiny_config(tmp_path, training={"epochs": 2, "polyak_epochs": 3})


def test_defaults_keep_the_committed_reference_run_ids():
    """New recipe keys at their defaults leave run ids (and so the reference runs) unchanged."""
    import csv
    from pathlib import Path

    from privseg.sweeps.spec import expand, load_sweep

    ref = Path(__file__).parents[1] / "results" / "reference" / "table1-quick.csv"
    rows = csv.DictReader(line for line in ref.read_text().splitlines()
                          if not line.startswith("#"))
    ids = {r["run_id"] for r in rows}
    runs = expand(load_sweep("quickstart"))
    assert runs and all(r.run_id in ids for r in runs)
    # ... while the tuned recipe (opt-in) leaves the reference: a recipe is part of the run
    tuned = expand(load_sweep("quickstart", {"model.recipe": "tuned"}))
    assert tuned and not any(r.run_id in ids for r in tuned)


def test_each_view_gets_its_own_augmentation_draw():
    from privseg.config import AugmentConfig
    from privseg.datasets.augment import view_augmentation

    assert view_augmentation(**AugmentConfig().model_dump()) is None  # default: off
    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 12).repeat(16, 1, 1, 1)  # 16 copies of one view
    y = torch.randint(0, 8, (1, 12, 12)).repeat(16, 1, 1)
    fx, fy = view_augmentation(flip=True)(x, y)
    flipped = [bool(torch.equal(fx[i], x[i].flip(-1))) for i in range(16)]
    kept = [bool(torch.equal(fx[i], x[i])) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))  # left-right flips only
    assert any(flipped) and any(kept)  # each view drew its own flip
    assert all(torch.equal(fy[i], y[i].flip(-1)) == flipped[i] for i in range(16))
    ax, ay = view_augmentation(affine=0.1, intensity=0.1)(x, y)
    assert ax.dtype == torch.float32 and ay.dtype == torch.long
    assert set(ay.unique().tolist()) <= set(range(8))  # nearest-neighbour labels
    assert len({round(float(v.sum()), 3) for v in ax}) == 16  # 16 different views


def test_augmented_run_trains_on_other_views_at_the_same_privacy_cost(baseline, one_thread):
    tmp, base = baseline
    rec = run_training(_dp_config(tmp, augment={"flip": True, "affine": 0.1}), progress=False)
    assert _accounting(rec) == _accounting(base)
    assert rec["history"][0]["train_loss"] != base["history"][0]["train_loss"]


@pytest.mark.parametrize("schedule", [
    {"kind": "cosine", "warmup_fraction": 0.25, "min_lr_fraction": 0.1},
    {"kind": "step", "milestones": [0.5], "gamma": 0.5}])
def test_lr_follows_the_schedule_once_per_logical_step(tmp_path, schedule, one_thread):
    import math

    from privseg.datasets.crops import SubjectCrops
    from privseg.training.step import prepare_training, train_step

    # physical chunks of 1 subject: several optimizer calls per logical step, one lr step
    cfg = tiny_config(tmp_path, training={"epochs": 2, "lr": 0.01, "physical_batch_size": 1,
                                          "lr_schedule": schedule},
                      privacy={"target_epsilon": 8.0, "noise_seed": 0})
    ss = load_dataset("phantom", TINY_PHANTOM, None, tmp_path / "cache")
    model = build("unet", 2, 1, ss.num_classes, base_channels=4, depth=2)
    state = prepare_training(cfg, model, SubjectCrops(ss.subjects[:16], 2, None, 1),
                             torch.device("cpu"))
    total = state.plan.steps
    lrs = []
    for _ in range(cfg.training.epochs):
        for x, y in state.loader:
            lrs.append(state.optimizer.param_groups[0]["lr"])
            train_step(state, x, y, cfg, torch.device("cpu"))
    assert len(lrs) == total
    lr = 0.01
    if schedule["kind"] == "cosine":
        w = round(0.25 * total)
        expected = [lr * (1 + t) / (w + 1) for t in range(w)] + [
            0.1 * lr + 0.9 * lr * (1 + math.cos(math.pi * t / (total - w))) / 2
            for t in range(total - w)]
    else:
        expected = [lr if t < round(0.5 * total) else lr / 2 for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_schedule_changes_no_accountant_number(baseline, one_thread):
    tmp, base = baseline
    rec = run_training(_dp_config(tmp, lr_schedule={"kind": "cosine", "warmup_fraction": 0.2}),
                       progress=False)
    assert _accounting(rec) == _accounting(base)
    assert rec["privacy"]["accountant_history"] == base["privacy"]["accountant_history"]
    assert rec["test"]["dice"] != base["test"]["dice"]  # the schedule did act


def test_automatic_clipping_refuses_ghost_mode(tmp_path):
    from privseg.config import ConfigError

    with pytest.raises(ConfigError, match="clipping=automatic"):
        tiny_config(tmp_path, privacy={"clipping": "automatic", "grad_sample_mode": "ghost"})


RECIPES = {"tuned": {"description": "test recipe",
                     "tuning": {"method": "TAN proxy", "sweep": "tune-tan-phantom2d",
                                "privacy_cost": "not covered"},
                     "architectures": {"unet": {"training": {"lr": 0.05, "ema": 0.99},
                                                "privacy": {"clipping": "automatic"}}}}}


def test_recipe_sets_the_architectures_settings_and_the_record_says_so(tmp_path, monkeypatch,
                                                                       one_thread):
    from privseg import recipes
    from privseg.config import ConfigError

    monkeypatch.setattr(recipes, "load_recipes", lambda: RECIPES)
    plain = tiny_config(tmp_path)
    cfg = tiny_config(tmp_path, model={"recipe": "tuned"})
    assert (cfg.training.lr, cfg.training.ema, cfg.privacy.clipping) == (0.05, 0.99,
                                                                       "automatic")
    assert cfg.run_id() != plain.run_id()  # the resolved values are in the run id
    with pytest.raises(ConfigError, match="model.recipe: no recipe 'nope'.*tuned"):
        tiny_config(tmp_path, model={"recipe": "nope"})
    with pytest.raises(ConfigError, match="no settings for model 'resunet-scalenorm'"):
        tiny_config(tmp_path, model={"name": "resunet-scalenorm", "recipe": "tuned"})
    rec = run_training(cfg, progress=False)
    assert rec["recipe"]["tuning_privacy_cost"] == "not covered"
    assert any("recipe 'tuned'" in line and "not covered" in line
               for line in rec["privacy"]["not_covered"])


def test_recipe_non_private_entry_applies_to_non_private_runs_only(tmp_path, monkeypatch):
    """A recipe's ``non_private`` entry tunes the non-private arm without touching DP runs."""
    from privseg import recipes
    from privseg.config import ConfigError

    arch = {"training": {"lr": 0.02, "ema": 0.99, "epochs": 3},
            "privacy": {"clipping": "automatic"},
            "non_private": {"training": {"lr": 0.004, "lr_schedule": {"kind": "cosine"}}}}
    monkeypatch.setattr(recipes, "load_recipes", lambda: {"r": {"architectures": {"*": arch}}})
    dp = tiny_config(tmp_path, model={"recipe": "r"})
    plain = tiny_config(tmp_path, model={"recipe": "r"}, privacy={"enabled": False})
    assert (dp.training.lr, dp.training.lr_schedule.kind) == (0.02, "constant")
    assert (plain.training.lr, plain.training.lr_schedule.kind) == (0.004, "cosine")
    # the rest of the architecture's settings hold in both arms
    assert dp.training.ema == plain.training.ema == 0.99
    assert dp.training.epochs == plain.training.epochs == 3
    bad = {"*": {**arch, "non_private": {"model": {"name": "unet"}}}}
    monkeypatch.setattr(recipes, "load_recipes", lambda: {"r": {"architectures": bad}})
    with pytest.raises(ConfigError, match="non_private.*sections \\['model'\\] not allowed"):
        tiny_config(tmp_path, model={"recipe": "r"}, privacy={"enabled": False})


def test_shipped_default_recipe_is_todays_settings():
    from privseg.config import load_config

    base = load_config("phantom2d")
    for name in ("unet", "resunet-scalenorm"):
        cfg = load_config("phantom2d", [f"model.name={name}", "model.recipe=default"])
        assert cfg.training == base.training and cfg.privacy == base.privacy


def test_tan_tuning_sweep_holds_b_over_sigma_and_steps_of_the_target_run():
    """Sander et al. 2023: the proxy's B/σ and step count are the ε = 8 quick-table run's."""
    from privseg.dp.accounting import plan_privacy
    from privseg.sweeps.spec import expand, load_sweep

    target = next(r.config for r in expand(load_sweep("quickstart"))
                  if r.config.model.name == "unet" and r.config.privacy.enabled
                  and r.config.privacy.target_epsilon == 8)
    runs = expand(load_sweep("tune-tan-phantom2d"))
    assert len({r.run_id for r in runs}) == len(runs) == 4
    n_train = 56
    t = target.training
    full = plan_privacy(n_train, t.expected_batch_size, t.epochs, target_epsilon=8.0,
                        delta=1e-5, accountant="prv")
    for run in runs:
        c = run.config
        proxy = plan_privacy(n_train, c.training.expected_batch_size, c.training.epochs,
                             noise_multiplier=c.privacy.noise_multiplier, delta=1e-5)
        assert proxy.steps == full.steps
        assert c.training.expected_batch_size / c.privacy.noise_multiplier == pytest.approx(
            t.expected_batch_size / full.noise_multiplier, rel=1e-4)


def test_study_phantom_preset_is_large_and_leaves_the_quick_phantom_alone():
    from privseg.config import ConfigError
    from privseg.datasets.phantom import PhantomOptions, _cache_key

    study = PhantomOptions(preset="study")
    assert (study.n_subjects, study.n_sites) == (1000, 3)
    assert PhantomOptions(preset="study", size=32).size == 32  # explicit options win
    # the quick default is untouched, and its cache (key pinned from before presets) too
    assert PhantomOptions().n_subjects == 160
    assert _cache_key(PhantomOptions()) == "808e5e8cbe250be7"
    same = PhantomOptions(n_subjects=1000, size=48, n_sites=3)
    assert _cache_key(study) == _cache_key(same)  # one cache for the same data
    with pytest.raises(ConfigError, match="dataset.options"):
        from privseg.config import parse_config

        parse_config({"dataset": {"options": {"preset": "huge"}}})


def test_ablation_recipes_are_default_plus_one_piece_of_tuned():
    """sweeps/ablation-phantom2d.yaml measures each piece of `tuned` alone: every `ablation-*`
    recipe must resolve to `default` with exactly that piece of `tuned` changed, for each
    architecture the study compares (so editing `tuned` without its ablation fails here)."""
    from importlib import resources

    import yaml

    from privseg.config import load_config

    # the EMA piece is the shared one, also where `tuned` chose an architecture's raw weights
    shared = yaml.safe_load((resources.files("privseg") / "recipes.yaml").read_text())
    ema = shared["_pieces"]["ema"]
    pieces = {"ablation-ema": [("training", "ema")],
              "ablation-augment": [("training", "augment")],
              "ablation-schedule": [("training", "lr_schedule")],
              "ablation-lr": [("training", "lr"), ("privacy", "clipping")]}
    for name in ("unet", "resunet-scalenorm"):
        def cfg(recipe, name=name):
            return load_config("phantom2d", [f"model.name={name}", f"model.recipe={recipe}"])

        base, tuned = cfg("default"), cfg("tuned")
        for recipe, keys in pieces.items():
            got = cfg(recipe)
            for section in ("training", "privacy"):
                want = getattr(base, section).model_dump()
                want.update({k: ema if k == "ema" else getattr(getattr(tuned, s), k)
                             for s, k in keys if s == section})
                want = type(getattr(base, section)).model_validate(want).model_dump()
                assert getattr(got, section).model_dump() == want, (name, recipe, section)
        assert tuned.training.ema in (None, ema), name
        # and `tuned` differs from `default` in every other piece (else its row is moot)
        for section, key in [k for ks in pieces.values() for k in ks if k[1] != "ema"]:
            assert getattr(getattr(tuned, section), key) != getattr(
                getattr(base, section), key), (name, key)


@pytest.mark.parametrize("dims", [2, 3])
def test_fast_augmentation_equals_plain_monai_bitwise(dims):
    """No metadata tracking and a cached affine grid change no value: the views equal those of
    the same MONAI transforms applied plainly (MetaTensors, a grid per view), same seeds."""
    import math

    import monai.transforms as mt

    from privseg.datasets.augment import view_augmentation

    shape = (12,) * dims
    torch.manual_seed(1)
    x, y = torch.randn(3, 1, *shape), torch.randint(0, 8, (3, *shape))
    keys = ["image", "label"]
    plain = mt.Compose([
        mt.RandFlipd(keys, prob=0.5, spatial_axis=dims - 1),
        mt.RandAffined(keys, prob=1.0, rotate_range=(0.1 * math.pi,) * (1 if dims == 2 else 3),
                       scale_range=(0.1,) * dims, mode=("bilinear", "nearest"),
                       padding_mode="zeros"),
        mt.RandScaleIntensityd("image", factors=0.1, prob=1.0),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=1.0),
        mt.RandAdjustContrastd("image", gamma=(0.9, 1.1), prob=1.0)])
    torch.manual_seed(5)
    plain.set_random_state(int(torch.randint(0, 2**31 - 1, (1,))))
    ref = [plain({"image": xi, "label": yi[None]}) for xi, yi in zip(x, y, strict=True)]
    torch.manual_seed(5)
    fx, fy = view_augmentation(True, 0.1, 0.1, dims=dims, spatial_size=shape)(x, y)
    for i, r in enumerate(ref):
        assert torch.equal(fx[i], r["image"].as_tensor().float())
        assert torch.equal(fy[i], r["label"].as_tensor()[0].round().long())
    assert not torch.equal(fx[0], x[0])
