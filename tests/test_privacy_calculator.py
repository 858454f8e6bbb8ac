"""``privseg privacy`` answers a question asked before from its disk cache, exactly as
computed, and computes again whenever the question, Opacus or privseg's accounting differ."""

import pytest
from typer.testing import CliRunner

import privseg.dp.accounting as accounting
import privseg.dp.calculator_cache as cache
from privseg.cli import app

ARGS = ["privacy", "--subjects", "40", "--batch", "8", "--epochs", "3", "--sigma", "1.2"]


def _ask(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _refuse(*a, **k):
    raise AssertionError("computed although the answer was stored")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_a_repeated_question_is_read_back_exactly(home, monkeypatch):
    first = _ask(ARGS)
    assert cache.cache_file().is_file()
    monkeypatch.setattr(accounting, "plan_privacy", _refuse)
    assert _ask(ARGS) == first  # same digits, without a calibration
    with pytest.raises(AssertionError, match="computed although"):
        _ask(ARGS[:-1] + ["1.3"])  # another question is computed (here: refused)


def test_stored_answers_expire_with_opacus_or_privseg_code(home, monkeypatch):
    _ask(ARGS)
    key = cache.question_key(subjects=40, batch=8, epochs=3, epsilon=None, sigma=1.2,
                             delta=None, accountant="prv")
    assert cache.cached_answer(key) is not None
    monkeypatch.setattr(cache.metadata, "version", lambda name: "0.0-other")
    assert cache.question_key(subjects=40, batch=8, epochs=3, epsilon=None, sigma=1.2,
                              delta=None, accountant="prv") != key
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(cache, "_SOURCES", ("accounting.py",))
    assert cache.question_key(subjects=40, batch=8, epochs=3, epsilon=None, sigma=1.2,
                              delta=None, accountant="prv") != key


def test_a_weak_delta_is_warned_from_the_cache_too(home, monkeypatch):
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("privseg")
    logger.addHandler(handler)
    try:
        args = ARGS + ["--delta", "0.004"]  # ≥ 1/(10 n) for n = 40
        _ask(args)
        assert len(seen) == 1 and "warning" in seen[0]
        monkeypatch.setattr(accounting, "plan_privacy", _refuse)
        _ask(args)
        assert len(seen) == 2 and seen[1] == seen[0]
    finally:
        logger.removeHandler(handler)


def test_the_calculator_and_help_load_no_config_models_torch_or_pandas(tmp_path):
    """The CLI's path is lazy (issue 19): a new ``privseg privacy`` question and ``--help``
    import neither the config models (pydantic) nor torch, Opacus' real package or pandas, in
    a fresh process. A top-level import of any of them in a sub-app fails this."""
    import json
    import os
    import subprocess
    import sys

    probe = ("import json, sys\nfrom privseg.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = ('privseg.config', 'pydantic', 'torch', 'opacus', 'pandas')\n"
             "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    for args in (["privacy", "--subjects", "50", "--batch", "5", "--epochs", "2",
                  "--epsilon", "4"], ["--help"], ["privacy", "--help"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [], args
