"""Configs are typed and validated; the run id is a canonical hash; bad configs write nothing."""

import subprocess
import sys

import pytest
import yaml
from spine_helpers import tiny_config

from privseg.config import ConfigError, builtin_configs, load_config, parse_config


def test_builtin_configs_validate():
    names = builtin_configs()
    assert "phantom2d" in names
    for name in names:
        load_config(name)


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError) as e:
        parse_config({"training": {"epoch": 3}})
    msg = str(e.value)
    assert "training.epoch" in msg and "epochs" in msg and "expected_batch_size" in msg


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        parse_config({"privacy": {"accountant": "moments"}})
    msg = str(e.value)
    assert "privacy.accountant" in msg and "'prv'" in msg and "'rdp'" in msg


def test_unknown_model_and_knob_are_named():
    with pytest.raises(ConfigError, match="unknown model 'unet9'.*unet"):
        parse_config({"model": {"name": "unet9"}})
    with pytest.raises(ConfigError, match="no option.*widht.*allowed.*width"):
        parse_config({"model": {"name": "unet", "options": {"widht": 2}}})
    with pytest.raises(ConfigError, match="dataset.options.*n_subject"):
        parse_config({"dataset": {"options": {"n_subject": 3}}})


def test_ghost_mode_with_several_crops_is_rejected():
    with pytest.raises(ConfigError, match="ghost.*crops_per_subject"):
        parse_config({"privacy": {"grad_sample_mode": "ghost"},
                      "training": {"crops_per_subject": 2}})


def test_run_id_is_canonical(tmp_path):
    a = parse_config({"seed": 1, "training": {"epochs": 2, "lr": 0.01}})
    b = parse_config({"training": {"lr": 0.01, "epochs": 2}, "seed": 1})
    assert a.run_id() == b.run_id()
    c = parse_config({"seed": 2, "training": {"epochs": 2, "lr": 0.01}})
    assert c.run_id() != a.run_id()
    # Where results go and how they are tracked do not change what is computed.
    d = parse_config({"seed": 1, "training": {"epochs": 2, "lr": 0.01},
                      "output": {"dir": "elsewhere"}, "tracking": {"wandb": "off"}})
    assert d.run_id() == a.run_id()


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config("phantom2d", ["training.epochs=3", "privacy.enabled=false",
                                    "tracking.wandb=off"])
    assert cfg.training.epochs == 3 and cfg.privacy.enabled is False
    assert cfg.tracking.wandb == "off"


def test_bad_config_exits_nonzero_names_key_and_writes_no_record(tmp_path):
    good = tiny_config(tmp_path).model_dump(mode="json")
    good["privacy"]["acountant"] = "rdp"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(good))
    proc = subprocess.run([sys.executable, "-m", "privseg.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "privacy.acountant" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_delta_not_below_one_over_n_stops_before_training(tmp_path):
    cfg = tiny_config(tmp_path, privacy={"delta": 0.5})
    from privseg.run import run as run_training

    with pytest.raises(ValueError, match="delta"):
        run_training(cfg, progress=False)
    assert not list((tmp_path / "runs").glob("*/record.json"))


def test_grad_sample_mode_must_be_one_the_model_passed():
    with pytest.raises(ConfigError, match="grad_sample_mode.*unet.*hooks"):
        parse_config({"privacy": {"grad_sample_mode": "ew"}})


def test_empty_file_and_directory_are_not_configs(tmp_path):
    """An empty file used to start a full default training run; a directory, a traceback."""
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: empty config"):
        load_config(str(tmp_path / "empty.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_a_bad_override_is_blamed_on_the_override_not_the_file():
    with pytest.raises(ConfigError, match=r"phantom2d.yaml with --set training.epochz=1: "
                                          r"training.epochz: unknown key"):
        load_config("phantom2d", ["training.epochz=1"])
    assert load_config("phantom2d", ["training.epochs=5"]).training.epochs == 5


def test_leftover_dataset_options_blame_the_key_and_list_the_allowed_ones():
    from privseg.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("phantom2d", ["dataset.name=feta", "dataset.root=/nonexistent"])
    msg = str(err.value)
    assert "dataset.options.n_subjects: unknown key" in msg and "see docs" not in msg
    assert "options of dataset 'feta' are: spacing" in msg and "Value error" not in msg
