"""Sweep files: W&B sweep YAML that the local runner can also expand and run.

One file serves both ``wandb sweep FILE`` + ``wandb agent`` and ``privseg sweep FILE``:

- It uses only keys of W&B's sweep schema (``name``, ``description``, ``project``, ``entity``,
  ``method``, ``metric``, ``run_cap``, ``command``, ``parameters``), whose top level allows no
  other keys. Our conventions live inside ``parameters``:

  - ``base: {value: NAME_OR_PATH}`` names the base run config (a built-in name such as
    ``phantom2d``, or a YAML path; a relative path is resolved against the sweep file first).
  - every other parameter is a dotted run-config path (``model.name``, ``seed``,
    ``privacy.target_epsilon``, ``dataset.options.n_subjects``); ``value`` is a constant,
    ``values`` a grid axis (or a categorical choice for ``method: random``).
  - ``privacy.target_epsilon: inf`` (also ``.inf``, ``∞``, ``none``) means non-private: the run
    gets ``privacy.enabled: false`` and keeps the base's other privacy keys.

- ``command: [privseg, sweep-run, "${args_no_hyphens}"]`` makes a W&B agent call
  ``privseg sweep-run base=... model.name=unet privacy.target_epsilon=8 ...``, which builds the
  same run config as the local runner does (:func:`build_run_config`), so a run has the same run
  id either way.

Every run is grouped by sweep (``tracking.group`` = the sweep's ``name``) and tagged with its
architecture, ε and setting.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from privseg.config import (
    AuditConfig,
    ConfigError,
    RunConfig,
    parse_config,
    read_config_mapping,
    resolve_config_path,
)
from privseg.errors import SweepError  # defined there so the CLI imports it without pydantic

BASE_KEY = "base"
AGENT_COMMAND = ["privseg", "sweep-run", "${args_no_hyphens}"]
EPSILON_KEY = "privacy.target_epsilon"
_INF_WORDS = {"inf", "+inf", ".inf", "infinity", "∞", "none", "null", "non-private"}
# W&B's sweep schema: the top level allows these keys and no others.
WANDB_TOP_LEVEL = {"apiVersion", "kind", "controller", "description", "program", "job",
                   "image_uri", "entity", "project", "method", "command", "name", "run_cap",
                   "metric", "metrics", "scheduler", "early_terminate", "parameters"}
_RANDOM_DISTRIBUTIONS = {"categorical", "constant", "uniform", "int_uniform",
                         "log_uniform_values"}




def is_infinite_epsilon(value: Any) -> bool:
    """Whether a sweep value for ``privacy.target_epsilon`` means ε = ∞ (non-private)."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in _INF_WORDS
    return isinstance(value, int | float) and math.isinf(value) and value > 0


def builtin_sweeps() -> dict[str, Path]:
    """Sweep files shipped inside the package, by name."""
    root = resources.files("privseg.sweeps")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_sweep_path(name_or_path: str | Path) -> Path:
    """A sweep file path, or the path of the built-in sweep of that name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    key = p.name[:-5] if p.name.endswith(".yaml") else str(name_or_path)
    builtin = builtin_sweeps()
    if key in builtin:
        return builtin[key]
    raise SweepError(f"{name_or_path}: no such file and no built-in sweep of that name; "
                     f"built-in: {', '.join(sorted(builtin))}")


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    path: Path | None
    raw: dict
    base: str
    method: str
    parameters: dict[str, dict]
    extra_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return str(self.raw.get("description", "")).strip()


@dataclass
class SweepRun:
    """One point of the expanded sweep."""

    index: int
    params: dict[str, Any]
    config: RunConfig | None = None
    error: str | None = None
    swept: tuple[str, ...] = ()

    @property
    def run_id(self) -> str | None:
        return self.config.run_id() if self.config is not None else None

    @property
    def label(self) -> str:
        """Short human label: the swept values."""
        keys = self.swept or tuple(self.params)
        return run_label({k: v for k, v in self.params.items() if k in keys})


def run_label(params: dict[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        if k == BASE_KEY:
            continue
        short = k.split(".")[-1]
        if k == EPSILON_KEY:
            parts.append("ε=∞" if is_infinite_epsilon(v) else f"ε={v:g}" if isinstance(
                v, int | float) else f"ε={v}")
        elif short == "name" and k == "model.name":
            parts.append(str(v))
        elif k == "audit" and isinstance(v, dict):
            parts.append(AuditConfig(**v).tag())
        elif isinstance(v, dict):
            parts.append(f"{short}={v['kind']}" if "kind" in v else
                         f"{short}={json.dumps(v, separators=(',', ':'))}")
        else:
            parts.append(f"{short}={v}")
    return " ".join(parts)


def load_sweep(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file (or a built-in sweep by name)."""
    path = resolve_sweep_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    return parse_sweep(raw, path, overrides)


def parse_sweep(raw: dict, path: Path | None = None, overrides: dict[str, Any] | None = None
                ) -> Sweep:
    src = str(path) if path else "sweep"
    if not isinstance(raw, dict):
        raise SweepError(f"{src}: top level must be a mapping")
    unknown = sorted(set(raw) - WANDB_TOP_LEVEL)
    if unknown:
        raise SweepError(f"{src}: unknown top-level key(s) {', '.join(unknown)}; W&B's sweep "
                         f"schema allows only {', '.join(sorted(WANDB_TOP_LEVEL))} (put run "
                         f"settings under parameters as dotted config paths)")
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise SweepError(f"{src}: method: {method!r} is not supported by the local runner "
                         "(grid or random)")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{src}: parameters: expected a non-empty mapping")
    for key, spec in params.items():
        _check_param(src, key, spec, method)
    base_spec = params.get(BASE_KEY)
    if base_spec is None or "value" not in base_spec:
        raise SweepError(f"{src}: parameters.{BASE_KEY}: give the base run config as "
                         f"`{BASE_KEY}: {{value: phantom2d}}` (built-in name or YAML path)")
    if method == "random" and not isinstance(raw.get("run_cap"), int):
        raise SweepError(f"{src}: method: random needs run_cap (number of runs)")
    name = raw.get("name") or (path.stem if path else "sweep")
    return Sweep(name=str(name), path=path, raw=raw, base=str(base_spec["value"]),
                 method=method, parameters=params, extra_overrides=dict(overrides or {}))


def _check_param(src: str, key: str, spec: Any, method: str) -> None:
    where = f"{src}: parameters.{key}"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{value: X}} or "
                         "{values: [X, Y]}")
    if "parameters" in spec:
        raise SweepError(f"{where}: nested parameters are not used here; write the dotted "
                         f"path instead (e.g. {key}.sub: {{values: [...]}})")
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise SweepError(f"{where}.values: expected a non-empty list")
    elif "value" not in spec:
        dist = spec.get("distribution")
        if method != "random" or dist not in _RANDOM_DISTRIBUTIONS or not {
                "min", "max"} <= set(spec):
            raise SweepError(f"{where}: expected `value`, `values`, or (method: random) "
                             f"min/max with distribution in {sorted(_RANDOM_DISTRIBUTIONS)}")
    if key == BASE_KEY and "value" not in spec:
        raise SweepError(f"{where}: the base config must be a single `value`")


def expand_params(sweep: Sweep) -> list[dict[str, Any]]:
    """The parameter sets of the sweep: a grid in file order, or ``run_cap`` random draws."""
    constants = {k: s["value"] for k, s in sweep.parameters.items() if "value" in s}
    axes = {k: s["values"] for k, s in sweep.parameters.items() if "values" in s}
    if sweep.method == "grid":
        if any("value" not in s and "values" not in s for s in sweep.parameters.values()):
            raise SweepError(f"{sweep.name}: method: grid takes only value/values parameters")
        combos = [dict(zip(axes, vals, strict=True))
                  for vals in itertools.product(*axes.values())]
    else:
        rng = random.Random(0)
        combos = []
        for _ in range(int(sweep.raw["run_cap"])):
            combo = {}
            for k, s in sweep.parameters.items():
                if "values" in s:
                    combo[k] = rng.choice(s["values"])
                elif "value" not in s:
                    combo[k] = _draw(rng, s)
            combos.append(combo)
    out = []
    for combo in combos:
        params = {}
        for k in sweep.parameters:  # keep file order
            params[k] = combo[k] if k in combo else constants[k]
        out.append(params)
    return out


def _draw(rng: random.Random, spec: dict) -> Any:
    lo, hi = spec["min"], spec["max"]
    dist = spec.get("distribution", "uniform")
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.uniform(lo, hi)


def _set_path(data: dict, key: str, value: Any) -> None:
    value = copy.deepcopy(value)  # never alias a sweep's own value (later edits would leak)
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def _base_data(base: str, sweep_path: Path | None) -> tuple[dict, str]:
    candidates = []
    if sweep_path is not None and not Path(base).is_absolute():
        candidates.append(sweep_path.parent / base)
    candidates.append(Path(base))
    for c in candidates:
        if c.is_file():
            path = c
            break
    else:
        path = resolve_config_path(base)
    return read_config_mapping(path), str(path)


def epsilon_tag(value: Any) -> str:
    if is_infinite_epsilon(value):
        return "eps:inf"
    return f"eps:{float(value):g}"


def build_run_config(params: dict[str, Any], *, sweep_name: str | None = None,
                     sweep_path: Path | None = None, output_dir: str | None = None,
                     extra: dict[str, Any] | None = None,
                     swept: tuple[str, ...] | None = None) -> RunConfig:
    """The run config of one sweep point: base config + dotted parameters + sweep metadata.

    Used by the local runner and by ``privseg sweep-run`` (the W&B agent's command), so both
    produce the same config and run id. Raises :class:`ConfigError` naming the bad key.
    """
    params = dict(params)
    base = params.pop(BASE_KEY, None)
    if base is None:
        raise ConfigError(f"sweep parameter {BASE_KEY!r} (the base run config) is missing")
    data, src = _base_data(str(base), sweep_path)
    data = json.loads(json.dumps(data))
    merged = {**params, **(extra or {})}
    for key, value in merged.items():
        if key == EPSILON_KEY and is_infinite_epsilon(value):
            _set_path(data, "privacy.enabled", False)
            continue
        if key == EPSILON_KEY and isinstance(value, str):
            value = yaml.safe_load(value)
        _set_path(data, key, value)
    if EPSILON_KEY in merged:
        private = not is_infinite_epsilon(merged[EPSILON_KEY])
        _set_path(data, "privacy.enabled", private)
        setting = data.get("setting") or {}
        if setting.get("kind") == "federated":
            # ε = ∞ in a federated run: no DP at all; a finite ε: per-subject DP in each site
            # unless the sweep chose a mode (e.g. site-level DP-FedAvg).
            mode = (setting.get("federated") or {}).get("dp_mode")
            if not private:
                _set_path(data, "setting.federated.dp_mode", "none")
            elif mode in (None, "none"):
                _set_path(data, "setting.federated.dp_mode", "sample")
    if output_dir is not None:
        _set_path(data, "output.dir", str(output_dir))
    cfg = parse_config(data, source=f"{src} + sweep parameters")
    if sweep_name:
        cfg.tracking.group = cfg.tracking.group or sweep_name
    eps = cfg.privacy.target_epsilon if cfg.privacy.enabled else math.inf
    if cfg.privacy.enabled and cfg.privacy.noise_multiplier is not None:
        eps_tag = f"sigma:{cfg.privacy.noise_multiplier:g}"
    else:
        eps_tag = epsilon_tag(eps)
    tags = [f"arch:{cfg.model.name}", eps_tag, f"setting:{cfg.setting.kind}",
            f"seed:{cfg.seed}"]
    if sweep_name:
        tags.append(f"sweep:{sweep_name}")
    cfg.tracking.tags = list(dict.fromkeys([*cfg.tracking.tags, *tags]))
    extra_keys = [k for k in (swept or ()) if not k.startswith(_NAMED_PREFIXES)]
    cfg.name = point_name(cfg, {k: params[k] for k in extra_keys if k in params})
    return cfg


#: parameters :func:`point_name` always names (from the config), under any runner
_NAMED_PREFIXES = ("base", "model.name", "model.options.width", "setting", "privacy", "seed",
                   "tracking.", "output.")


def point_name(cfg: RunConfig, extra: dict[str, Any] | None = None) -> str:
    """A sweep point's run name, from what distinguishes points: architecture, width, setting,
    ε and seed (``resunet-scalenorm ε=8 s0``, ``unet width=2 federated non-private s1``).

    Built from the run config, so ``privseg sweep``, ``privseg sweep --wandb`` + ``wandb
    agent`` and a bare ``wandb agent`` on the YAML name a point alike (the base config's own
    name is never used: it names no point). ``extra``: other swept keys the local runner
    knows of (W&B's agent passes every parameter, swept or not, so it cannot add them).
    """
    parts = [cfg.model.name]
    width = (cfg.model.options or {}).get("width")
    if width is not None:
        parts.append(f"width={width:g}" if isinstance(width, int | float) else f"width={width}")
    if cfg.setting.kind != "central":
        fed = cfg.setting.federated
        mode = getattr(fed, "dp_mode", None) if fed is not None else None
        parts.append(cfg.setting.kind + (f" {mode}-DP" if mode in ("site", "svt") else ""))
    if not cfg.privacy.enabled:
        parts.append("non-private")
    elif cfg.privacy.noise_multiplier is not None:
        parts.append(f"σ={cfg.privacy.noise_multiplier:g}")
    else:
        parts.append(f"ε={cfg.privacy.target_epsilon:g}")
    if cfg.audit is not None:
        parts.append(cfg.audit.tag())
    if extra:
        parts.append(run_label(extra))
    parts.append(f"s{cfg.seed}")
    return " ".join(p for p in parts if p)


def expand(sweep: Sweep, output_dir: str | None = None) -> list[SweepRun]:
    """Every run of the sweep with its validated config, or the error that stops it."""
    runs = []
    swept = tuple(k for k, s in sweep.parameters.items() if "value" not in s)
    for i, params in enumerate(expand_params(sweep)):
        run = SweepRun(index=i, params=params, swept=swept)
        try:
            run.config = build_run_config(params, sweep_name=sweep.name, sweep_path=sweep.path,
                                          output_dir=output_dir, extra=sweep.extra_overrides,
                                          swept=swept)
        except (ConfigError, ValueError) as e:
            run.error = str(e)
        runs.append(run)
    return runs


def parse_agent_args(args: list[str]) -> dict[str, Any]:
    """``key=value`` arguments as W&B's ``${args_no_hyphens}`` passes them (values as YAML)."""
    params: dict[str, Any] = {}
    for item in args:
        if "=" not in item:
            raise ConfigError(f"{item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key == BASE_KEY:
            params[key] = raw
            continue
        value = yaml.safe_load(raw) if raw != "" else ""
        if value == "None":
            value = None
        params[key] = value
    return params


def to_wandb(sweep: Sweep) -> dict:
    """The dict ``wandb.sweep`` gets: this file, with ε = ∞ as a string, the group pinned,
    the agent command set, and ``--set`` overrides folded in as constants."""
    raw = json.loads(json.dumps(sweep.raw, default=str, allow_nan=True))
    out = {k: v for k, v in raw.items() if k in WANDB_TOP_LEVEL}
    out.setdefault("name", sweep.name)
    out.setdefault("method", sweep.method)
    out["command"] = list(out.get("command") or AGENT_COMMAND)
    params = {}
    for key, spec in sweep.parameters.items():
        spec = dict(spec)
        if key == EPSILON_KEY:
            if "values" in spec:
                spec["values"] = ["inf" if is_infinite_epsilon(v) else v for v in spec["values"]]
            if "value" in spec and is_infinite_epsilon(spec["value"]):
                spec["value"] = "inf"
        params[key] = spec
    for key, value in sweep.extra_overrides.items():
        params[key] = {"value": "inf" if key == EPSILON_KEY and is_infinite_epsilon(value)
                       else value}
    params.setdefault("tracking.group", {"value": sweep.name})
    out["parameters"] = params
    # W&B stores the config as JSON: no NaN/inf may remain.
    json.dumps(out, allow_nan=False)
    return out
