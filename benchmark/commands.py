"""The core commands: ``train``, ``privacy``, ``configs``, ``models``, ``bench``, ``data check``.

A sub-app of the ``privseg`` command tree, assembled in :mod:`privseg.cli`.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Annotated

import typer

from privseg.cli_common import fail, print_summary, quiet_flower, show_info_logs
from privseg.errors import ConfigError

app = typer.Typer()
data_app = typer.Typer(help="Inspect and validate data sets.", no_args_is_help=True)


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML run config, or a built-in name "
                                               "(see `privseg configs`)")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set training.epochs=5 "
                            "--set privacy.target_epsilon=1")] = None,
    force: Annotated[bool, typer.Option(help="Rerun even if a complete record exists")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train one model as the config says; write a checkpoint and a run record.

    The record lands in OUTPUT_DIR/RUN_ID/record.json, where RUN_ID is the hash of the config;
    rerunning a finished config does nothing unless --force.

    Example:  privseg train phantom2d --set privacy.target_epsilon=1 --set training.epochs=5
    """
    from privseg.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        fail(str(e))
    from privseg.run import run  # torch, MONAI, Opacus: only for a config that validated

    show_info_logs()
    if cfg.setting.kind == "federated":
        quiet_flower()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    warnings.filterwarnings("ignore", message=".*is all 0, this may result in nan/inf distance")
    try:
        record = run(cfg, progress=progress, force=force)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(f"{cfg.name or config}: {e}", code=1)
    print_summary(record, Path(cfg.output.dir) / record["run_id"])


@app.command()
def privacy(
    subjects: Annotated[int, typer.Option(help="Number of training subjects n")],
    batch: Annotated[int, typer.Option(help="Expected subjects per step")],
    epochs: Annotated[int, typer.Option(
        help="Epochs, each int(1/q) Poisson steps with q = batch/n (Opacus DPDataLoader)")],
    epsilon: Annotated[float | None, typer.Option(help="Target ε -> σ")] = None,
    sigma: Annotated[float | None, typer.Option(help="Noise multiplier σ -> ε")] = None,
    delta: Annotated[float | None, typer.Option(
        help="δ (default min(1e-5, 1/n^1.1, 1/(100n)))")] = None,
    accountant: Annotated[str, typer.Option(help="prv or rdp")] = "prv",
) -> None:
    """Privacy calculator: σ for a target ε, or ε spent for a given σ (per subject).

    Example:  privseg privacy --subjects 120 --batch 8 --epochs 60 --epsilon 8
    """
    from privseg.dp.calculator_cache import cached_answer, question_key, store_answer

    if (epsilon is None) == (sigma is None):
        fail("give exactly one of --epsilon and --sigma")
    if accountant not in ("prv", "rdp"):
        fail("--accountant must be prv or rdp")
    warnings.filterwarnings("ignore")
    show_info_logs()  # a weak δ is warned through privseg's logger
    # a question asked before is answered from disk, without SciPy or a calibration
    key = question_key(subjects=subjects, batch=batch, epochs=epochs, epsilon=epsilon,
                       sigma=sigma, delta=delta, accountant=accountant)
    answer = cached_answer(key)
    if answer is None:
        answer = _privacy_answer(subjects, batch, epochs, epsilon, sigma, delta, accountant)
        store_answer(key, answer)
    elif answer["delta_warning"]:
        logging.getLogger("privseg").warning("warning: %s", answer["delta_warning"])
    eps = answer["epsilon"]
    typer.echo(f"subjects n        {answer['n_subjects']}")
    typer.echo(f"sample rate q     {answer['sample_rate']:.6f}  (expected batch {batch})")
    typer.echo(f"steps             {answer['steps']}  ({answer['steps_per_epoch']} per epoch × "
               f"{epochs})")
    typer.echo(f"delta             {answer['delta']:.4g}")
    typer.echo(f"noise multiplier  {answer['noise_multiplier']:.6f}")
    typer.echo(f"epsilon           {eps:.4f}  ({accountant})" if math.isfinite(eps)
               else "epsilon           inf")


def _privacy_answer(subjects: int, batch: int, epochs: int, epsilon: float | None,
                    sigma: float | None, delta: float | None, accountant: str) -> dict:
    """What ``privseg privacy`` prints, computed (Opacus' accountants, no torch)."""
    from privseg.dp.accounting import epsilon_for, plan_privacy

    try:
        plan = plan_privacy(subjects, batch, epochs, target_epsilon=epsilon, noise_multiplier=sigma,
                            delta=delta, accountant=accountant)
    except ValueError as e:
        fail(str(e))
    eps = epsilon_for(plan.noise_multiplier, plan.sample_rate, plan.steps, plan.delta, accountant)
    return {"n_subjects": plan.n_subjects, "sample_rate": plan.sample_rate,
            "steps": plan.steps, "steps_per_epoch": plan.steps_per_epoch,
            "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
            "epsilon": eps if math.isfinite(eps) else math.inf,
            "delta_warning": plan.delta_warning}


@app.command()
def configs() -> None:
    """List the built-in run configs.

    Example:  privseg configs
    """
    from privseg.config import builtin_configs

    for name, path in sorted(builtin_configs().items()):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        typer.echo(f"{name:24s} {first.lstrip('# ')}")


@app.command()
def models(
    format: Annotated[str, typer.Option("--format", help="markdown or csv")] = "markdown",
) -> None:
    """Table of registered architectures: dims, parameters, MACs, DP modes, paper.

    Example:  privseg models --format csv > models.csv
    """
    from privseg.architectures.table import models_table

    if format not in ("markdown", "csv"):
        fail("--format must be markdown or csv")
    typer.echo(models_table(format))


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Registry model name")] = "unet",
    dims: Annotated[int, typer.Option(help="2 (slices) or 3 (patches)")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    batch: Annotated[int, typer.Option(help="Subjects per step (one crop each)")] = 32,
    size: Annotated[int | None, typer.Option(help="Crop edge (default 256 in 2D, 96 in 3D)")]
    = None,
    modes: Annotated[str, typer.Option(help="Comma-separated: nonprivate, opacus (stock "
                                            "Opacus hooks), hooks, torchfunc (the plain "
                                            "torch.func peer), functorch, ew, ghost; "
                                            "hooks+opacus etc. pick the conv sampler")]
    = "nonprivate,opacus,hooks,torchfunc,functorch,ew,ghost",
    steps: Annotated[int, typer.Option(help="Timed steps per mode")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps per mode first")] = 2,
    amp: Annotated[bool, typer.Option(help="bf16 autocast (CUDA)")] = False,
    channels_last: Annotated[bool, typer.Option(help="Channels-last 2D models (CUDA)")] = False,
    out: Annotated[Path, typer.Option(help="Directory for the JSON report")] = Path("runs/bench"),
) -> None:
    """Time non-private vs each DP mode step by step, alternating, in one process.

    Example:  OMP_NUM_THREADS=1 privseg bench --device cpu --dims 2 --size 48 --batch 32 --steps 15
    """
    from privseg.bench import ALL_MODES, format_bench, run_bench, write_bench

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen:
        fail(f"--modes is empty; allowed: {', '.join(ALL_MODES)}")
    if bad := [m for m in chosen if m not in ALL_MODES]:
        fail(f"unknown mode(s) {', '.join(bad)}; allowed: {', '.join(ALL_MODES)}")
    if dims not in (2, 3):
        fail("--dims must be 2 or 3")
    warnings.filterwarnings("ignore")
    try:
        report = run_bench(model, dims, device, batch, size, chosen, steps, warmup, amp,
                           channels_last=channels_last)
    except (KeyError, ValueError, RuntimeError) as e:
        fail(str(e.args[0]) if e.args else str(e))
    typer.echo(format_bench(report))
    typer.echo(f"wrote {write_bench(report, out)}")


@data_app.command("check")
def data_check(
    target: Annotated[str, typer.Argument(help="A run config (or built-in name), or a data "
                                               "folder together with --dataset")],
    dataset: Annotated[str | None, typer.Option(help="Data set name when TARGET is a folder "
                                                     "(feta, msd, brats, pets)")] = None,
) -> None:
    """Validate every subject (files, decoding, shapes, affines, labels, NaN); write nothing.

    Example:  privseg data check /data/feta_2.2 --dataset feta
    """
    from privseg.config import load_config
    from privseg.datasets.check import data_check_report

    if dataset is not None:
        name, options, root = dataset, {}, target
    else:
        try:
            cfg = load_config(target)
        except ConfigError as e:
            fail(str(e))
        name, options, root = cfg.dataset.name, cfg.dataset.options, cfg.dataset.root
    try:
        text, ok = data_check_report(name, options, root)
    except (KeyError, ValueError) as e:
        fail(str(e.args[0]) if e.args else str(e))
    typer.echo(text)
    if not ok:
        raise typer.Exit(1)


@data_app.command("upload-pacs")
def data_upload_pacs(
    config: Annotated[str, typer.Argument(help="A run config (or built-in name) whose data "
                                               "set is uploaded")],
    url: Annotated[str, typer.Option(help="DICOMweb root of the PACS (STOW-RS)")],
) -> None:
    """Upload the config's data set into a PACS as DICOM: per subject an MR series and a SEG.

    Then a config with ``dataset: {name: pacs, options: {url: ...}}`` reads it back.

    Example:  privseg data upload-pacs phantom2d --url http://127.0.0.1:8042/dicom-web
    """
    from privseg.config import load_config
    from privseg.datasets.faults import DataValidationError
    from privseg.datasets.pacs_upload import upload_dataset
    from privseg.training.setup import default_cache_dir

    try:
        cfg = load_config(config)
    except ConfigError as e:
        fail(str(e))
    d = cfg.dataset
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    warnings.filterwarnings("ignore", module="highdicom")
    try:
        done = upload_dataset(d.name, d.options, d.root, url, cache)
    except (DataValidationError, KeyError, ValueError, OSError) as e:
        fail(str(e.args[0]) if e.args else str(e))
    except Exception as e:  # HTTP errors of the PACS
        fail(f"{url}: upload failed ({type(e).__name__}: {e})")
    typer.echo(f"uploaded {len(done)} subjects of {d.name} to {url} as MR + SEG studies")
