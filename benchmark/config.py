"""Typed run configuration: one YAML file fully determines a run.

Validated on load: an unknown key or a bad value is a :class:`ConfigError` naming the key and
what is allowed. The run id is a hash of the canonical config (key order does not matter;
``tracking`` and ``output`` do not change what is computed and are left out).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from privseg.errors import ConfigError  # defined there so the CLI imports it without pydantic

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Strict):
    """Which data, in which mode, split how."""

    name: str = "phantom"
    root: str | None = Field(None, description="downloaded data folder (not for the phantom)")
    dims: Literal[2, 3] = 2
    options: dict[str, Any] = Field(default_factory=dict)
    patch_size: list[int] | None = Field(
        None, description="crop size; 2D: [H, W], 3D: [D, H, W]; default: the full slice/volume"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    cache_dir: str | None = Field(None, description="default: ~/.cache/privseg")

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave >= 10% for training")
        if self.patch_size is not None and len(self.patch_size) != self.dims:
            raise ValueError(f"patch_size needs {self.dims} entries for dims={self.dims}")
        return self


class ModelConfig(_Strict):
    """A registry model name and its knobs (see ``privseg models``)."""

    name: str = "unet"
    options: dict[str, Any] = Field(default_factory=dict)
    recipe: str | None = Field(
        None, description="per-architecture training settings from privseg/recipes.yaml "
        "(privseg.recipes), merged over the config's training/privacy keys")


class AugmentConfig(_Strict):
    """Random augmentation of each of a subject's k views (:mod:`privseg.datasets.augment`);
    all off by default."""

    flip: bool = Field(False, description="left-right flip with probability 1/2")
    affine: float = Field(0.0, ge=0.0, le=0.5, description="rotation up to ±a·π, scale ±a")
    intensity: float = Field(0.0, ge=0.0, le=1.0,
                             description="intensity scale and shift ±s, gamma in [1-s, 1+s]")


class LRScheduleConfig(_Strict):
    """Learning rate over the run's logical steps (:mod:`privseg.training.schedule`)."""

    kind: Literal["constant", "cosine", "step"] = "constant"
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                   description="linear warm-up over this fraction of the steps")
    min_lr_fraction: float = Field(0.0, ge=0.0, le=1.0, description="cosine: final lr / lr")
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75], description="step: fractions of the run's steps "
        "at which the lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: decay factor")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v):
            raise ValueError("milestones are fractions of the run's steps, each in (0, 1)")
        return v


class TrainingConfig(_Strict):
    """Optimisation. Batch sizes count subjects, the privacy unit."""

    epochs: int = Field(10, ge=1)
    expected_batch_size: int = Field(16, ge=1, description="expected subjects per logical step")
    physical_batch_size: int = Field(16, ge=1, description="subjects per forward/backward")
    crops_per_subject: int = Field(1, ge=1, description="k slices/patches per sampled subject")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(False, description="bf16 autocast (for CUDA; runs, slowly, on CPU too)")
    channels_last: bool = Field(
        False, description="channels-last memory format for 2D models on CUDA (NHWC convs)")
    eval_every: int = Field(1, ge=0, description="validate every n epochs (0: only at the end)")
    val_subjects: int | None = Field(
        None, ge=1, description="validations before the last epoch (federated: round) use "
        "this many validation subjects (per site): a fixed subset drawn once from the seed, "
        "so the curve is comparable; the last validation and the test use all. null: all")
    num_workers: int = Field(0, ge=0)
    foreground_fraction: float = Field(
        0.9, ge=0.0, le=1.0, description="chance a crop is centred in the brain/foreground"
    )
    ema: float | None = Field(
        None, gt=0.0, lt=1.0, description="decay of an exponential moving average of the "
        "weights, evaluated and checkpointed beside the raw model (De et al. 2022; "
        "post-processing: free in privacy); null: none")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="augmentation of each view: the k "
        "crops per subject become k augmented views, averaged into one clipped gradient")
    lr_schedule: LRScheduleConfig = Field(
        default_factory=LRScheduleConfig, description="warm-up and decay of the lr, stepped "
        "once per logical step; default: constant")
    polyak_epochs: int = Field(
        0, ge=0, description="also average the weights of the last n epochs (Polyak); 0: none")

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.polyak_epochs > self.epochs:
            raise ValueError(f"training.polyak_epochs={self.polyak_epochs} exceeds "
                             f"training.epochs={self.epochs}")
        return self


class PrivacyConfig(_Strict):
    """DP-SGD (Abadi et al. 2016) through Opacus, with the subject as the privacy unit."""

    enabled: bool = True
    target_epsilon: float | None = Field(8.0, gt=0.0)
    noise_multiplier: float | None = Field(
        None, ge=0.0, description="fixed sigma instead of a target epsilon"
    )
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="default min(1e-5, 1/n^1.1, 1/(100n)); n = training "
        "subjects (sites in site-level DP)")
    noise_seed: int | None = Field(
        None, ge=0, description="opt into DP noise and sampling reproducible from the config "
        "(benchmarks only: whoever holds the config can replay the noise); default: a secret "
        "seed from the operating system's entropy for every run")
    max_grad_norm: float = Field(1.0, gt=0.0)
    clipping: Literal["flat", "automatic"] = Field(
        "flat", description="flat: g·min(1, C/‖g‖) (Abadi et al. 2016); automatic: "
        "C·g/(‖g‖+γ) (Bu et al. 2022), every contribution below C; same noise and ε")
    auto_clip_gamma: float = Field(0.01, gt=0.0, description="automatic clipping's γ")
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: GradSampleMode = "hooks"
    conv_grad_sampler: Literal["opacus", "grouped", "bookkeeping"] = Field(
        "bookkeeping", exclude=True,
        description="per-sample conv gradients (hooks) and norms (ghost): Opacus' unfold "
        "sampler, privseg.dp.grad_samplers' grouped-conv sampler + mixed ghost norm, or "
        "bookkeeping = grouped, except that (hooks mode) layers where the ghost norm is cheaper "
        "keep input and output gradient instead of per-sample gradients and add their clipped "
        "sum as one weight gradient (privseg.dp.bookkeeping, Bu et al. 2023); exact every way, "
        "so excluded from dumps and the run id",
    )

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of privacy.target_epsilon and privacy.noise_multiplier"
            )
        return self


class LinkDown(_Strict):
    """A window in which a site's link is down (testbed): ``at_s`` seconds after the run was
    submitted, for ``for_s`` seconds; new connections are refused, open ones stall."""

    at_s: float = Field(ge=0.0, description="seconds after the run was submitted")
    for_s: float = Field(gt=0.0, description="seconds the link stays down")


class LinkProfile(_Strict):
    """A site's link to the SuperLink in ``privseg federated testbed`` (per direction).

    ``latency_ms``: one-way delay added in each direction (RTT grows by twice it);
    ``bandwidth_mbit``: rate in each direction (None: unshaped); ``loss``: probability that
    a packet (netem) or a relayed chunk (userspace relay: a TCP retransmission, delayed by
    one minimum RTO) is lost; ``down``: windows in which the link is down. A testbed
    description of the machine, not of the run: not part of the run id.
    """

    latency_ms: float = Field(0.0, ge=0.0, le=60_000.0)
    bandwidth_mbit: float | None = Field(None, gt=0.0, le=100_000.0)
    loss: float = Field(0.0, ge=0.0, lt=1.0)
    down: list[LinkDown] = Field(default_factory=list)

    def shaped(self) -> bool:
        """Whether anything about this link differs from an ideal one."""
        return bool(self.latency_ms or self.bandwidth_mbit or self.loss or self.down)


class FederatedConfig(_Strict):
    """Federated training on Flower (``setting.kind: federated``; see privseg.federated).

    ``dp_mode``: ``sample`` = DP-SGD inside each site (unit: subject; ``privacy.*`` as in a
    central run, calibrated per site over all its local steps); ``site`` = DP-FedAvg (unit: a
    whole site; ``privacy.target_epsilon``/``noise_multiplier``/``delta`` then refer to sites,
    ``site_clip_norm`` clips each site's update); ``svt`` = selective sharing with the sparse
    vector technique (Li et al. 2019; local DP per site update, ``privacy.target_epsilon`` is
    each site's ε over all rounds, ``share_fraction`` the fraction selected, ``svt_*``
    the mechanism; see privseg.dp.svt); ``none`` needs ``privacy.enabled: false``.
    ``share_fraction`` < 1 in the other modes: partial sharing (``share_rule``) without SVT.

    ``secure_aggregation`` (``dp_mode: site`` only, at least 3 sites per round, simulation only):
    Flower SecAgg+; the sites clip their own updates and the server sees only their sum; the
    ``secagg_*`` fields are its parameters (see privseg.federated.secagg).
    """

    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    rounds: int = Field(5, ge=1)
    local_epochs: int | None = Field(1, ge=1, description="local epochs per round")
    local_steps: int | None = Field(None, ge=1, description="local steps per round instead")
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0, description="fraction of sites per round")
    dp_mode: Literal["none", "sample", "site", "svt"] = "sample"
    partition: Literal["natural", "dirichlet", "size"] = "natural"
    n_sites: int | None = Field(None, ge=1, description="dirichlet/size partitions only")
    partition_alpha: float = Field(0.5, gt=0.0)
    partition_attribute: str | None = None
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx mu")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam eta")
    server_tau: float = Field(1e-3, gt=0.0, description="FedAdam tau")
    site_clip_norm: float = Field(1.0, gt=0.0, description="DP-FedAvg update clipping norm")
    secure_aggregation: bool = Field(
        False, description="Flower SecAgg+ (simulation; dp_mode=site only, >= 3 sites per "
        "round): the server sees only the sum of the sites' clipped updates")
    secagg_num_shares: int | None = Field(
        None, ge=3, description="SecAgg+ neighbours a site secret-shares its keys with "
        "(itself included); default: every site chosen in the round")
    secagg_reconstruction_threshold: int | None = Field(
        None, ge=2, description="SecAgg+ shares needed to unmask; fewer colluding parties "
        "learn nothing; default: a majority, num_shares // 2 + 1")
    secagg_clipping_range: float = Field(
        8.0, gt=0.0, description="SecAgg+ quantises each model value in [-R, R]; a value "
        "outside stops the site (it would be clipped silently)")
    secagg_quantization_range: int = Field(
        2**22, ge=2, le=2**31, description="SecAgg+ quantisation levels over [-R, R] "
        "(step 2R / levels); sites per round × levels must stay below the 2^32 modulus")
    svt_clip: float = Field(1e-3, gt=0.0, description="dp_mode=svt: each coordinate of a "
                            "site's update clipped to [-γ, γ] (Δ = γ per query)")
    svt_threshold: float = Field(1e-4, ge=0.0, description="dp_mode=svt: SVT threshold τ on "
                                 "|clipped update|")
    svt_release_share: float = Field(
        0.5, gt=0.0, lt=1.0, description="dp_mode=svt: share of each round's ε spent on the "
        "Laplace release of the selected values (the rest selects, split 1 : (2c)^(2/3))")
    share_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="each site sends only k = ceil(fraction·d) "
        "coordinates of its update (indices + values): chosen by share_rule, or with "
        "dp_mode=svt at most c = k chosen by the sparse vector technique")
    share_rule: Literal["topk", "random"] = Field(
        "topk", description="share_fraction < 1 without SVT: the largest |update| or a "
        "random subset (no DP of its own)")
    local_baseline: bool = Field(False, description="also train each site alone (simulation)")
    eval_every: int = Field(1, ge=0, description="validate at the sites every n rounds")
    min_fit_sites: int | None = Field(
        None, ge=1, description="least sites whose updates finish a round (and answer its "
        "evaluations); a round with fewer answers stops the run with a failed record; "
        "default: every site the round asked. Site-level DP with secure_aggregation always "
        "needs all N")
    links: dict[str, LinkProfile] | None = Field(
        None, description="testbed only: link profile per site name (site-A, ...) or "
        "'default' for every site not named; not part of the run id")

    @model_validator(mode="after")
    def _check(self) -> FederatedConfig:
        if (self.local_epochs is None) == (self.local_steps is None):
            raise ValueError("set exactly one of local_epochs and local_steps")
        if self.dp_mode == "svt" and self.share_rule != "topk":
            raise ValueError("setting.federated.share_rule applies without SVT: with "
                             "dp_mode=svt the sparse vector technique selects the coordinates")
        if self.dp_mode == "svt" and self.local_baseline:
            raise ValueError("setting.federated.local_baseline=true with dp_mode=svt is not "
                             "built: a site alone would train without its SVT release")
        if self.secure_aggregation and self.share_fraction < 1:
            raise ValueError("setting.federated.share_fraction < 1 with secure_aggregation: "
                             "SecAgg+ sums dense vectors; partial sharing is not built for it")
        if self.local_baseline and self.dp_mode == "site":
            raise ValueError("setting.federated.local_baseline=true needs dp_mode sample or "
                             "none: a site trained alone is a one-site federation, where "
                             "site-level DP has no meaning (δ would have to be below 1/1)")
        if self.secure_aggregation:
            key = "setting.federated.secure_aggregation"
            if self.dp_mode != "site":
                raise ValueError(
                    f"{key}=true needs dp_mode=site (got {self.dp_mode}): site-level DP is "
                    "the mode whose noise is added to the aggregate, so the server need not "
                    "see single updates; SecAgg+ with dp_mode=sample or none (updates "
                    "weighted by subject counts) is not built")
            if self.n_sites is not None and self.n_sites < 3:
                raise ValueError(f"{key}=true needs at least 3 sites (n_sites={self.n_sites}):"
                                 " with 2, each site could subtract its own update from the "
                                 "sum and read the other's")
            shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
            if shares is not None and threshold is not None and threshold >= shares:
                raise ValueError("setting.federated.secagg_reconstruction_threshold must be "
                                 f"below secagg_num_shares ({threshold} >= {shares})")
        return self


class SettingConfig(_Strict):
    """Central (pooled data) or federated (sites keep their data)."""

    kind: Literal["central", "federated"] = "central"
    federated: FederatedConfig | None = Field(None, description="kind=federated only")

    @model_validator(mode="before")
    @classmethod
    def _default_federated(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "federated" and (
            data.get("federated") is None
        ):
            data = {**data, "federated": {}}
        return data

    @model_validator(mode="after")
    def _check(self) -> SettingConfig:
        if self.kind == "central" and self.federated is not None:
            raise ValueError("setting.federated is only for setting.kind=federated")
        return self


class TrackingConfig(_Strict):
    """Weights & Biases. Images are never sent unless ``log_images`` is true."""

    wandb: Literal["auto", "online", "offline", "off"] = "auto"
    project: str = "privseg"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    log_images: bool = False

    @field_validator("wandb", mode="before")
    @classmethod
    def _yaml_off(cls, v: object) -> object:
        # YAML 1.1 reads a bare `off` as False.
        return "off" if v is False else v


class OutputConfig(_Strict):
    dir: str = "runs"
    save_checkpoint: bool = True


class AuditConfig(_Strict):
    """An empirical privacy audit instead of a plain run (``privseg audit``; Steinke, Nasr &
    Jagielski 2023, one training run): train once with ``canaries`` canaries of ``kind``, each
    in by a secret coin, and record the lower bound on ε next to the accountant's claim.

    ``gradient``: Dirac gradient canaries in the DP optimizer (central; federated ``sample``:
    inside one site) or canary site updates in DP-FedAvg (federated ``site``); ``input``: canary
    subjects (central and federated ``sample``). ``noise_fraction`` < 1 and ``clipping: false``
    are deliberate faults (the claim is unchanged), to show that the audit catches them.
    """

    kind: Literal["gradient", "input"] = "gradient"
    canaries: int | None = Field(None, ge=2, description="m; default 1000 gradient, 100 input")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    noise_fraction: float = Field(1.0, ge=0.0, description="fault: this fraction of the noise")
    clipping: bool = Field(True, description="fault when false: gradients summed unclipped")

    def canaries_m(self) -> int:
        """m, with the kind's default when unset."""
        return self.canaries or {"gradient": 1000, "input": 100}[self.kind]

    def broken(self) -> bool:
        return self.noise_fraction != 1.0 or not self.clipping

    def tag(self) -> str:
        """The audit's part of the run id: ``audit-KIND-mM[-noiseF][-noclip][-cC]``."""
        parts = [f"audit-{self.kind}-m{self.canaries_m()}"]
        if self.noise_fraction != 1.0:
            parts.append(f"noise{self.noise_fraction:g}")
        if not self.clipping:
            parts.append("noclip")
        if self.confidence != 0.95:
            parts.append(f"c{self.confidence:g}")
        return "-".join(parts)


class RunConfig(_Strict):
    """One run, fully determined."""

    name: str | None = None
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    setting: SettingConfig = Field(default_factory=SettingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    audit: AuditConfig | None = Field(None, description="audit the run instead (privseg audit)")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.privacy.enabled and self.privacy.grad_sample_mode == "ghost" and (
            self.training.crops_per_subject > 1
        ):
            raise ValueError(
                "privacy.grad_sample_mode=ghost needs training.crops_per_subject=1: ghost "
                "clipping computes norms per forward sample and cannot group k crops"
            )
        if self.privacy.enabled and self.privacy.grad_sample_mode == "ghost" and (
            self.training.amp
        ):
            raise ValueError(
                "training.amp=true needs privacy.grad_sample_mode hooks or functorch: ghost "
                "clipping takes norms in one pass and applies a gradient from a second, bf16 "
                "pass, so the clipped gradient's norm is bounded only up to bf16 rounding"
            )
        if self.privacy.enabled and self.privacy.clipping == "automatic" and (
            self.privacy.grad_sample_mode == "ghost"
        ):
            raise ValueError("privacy.clipping=automatic needs privacy.grad_sample_mode hooks "
                             "or functorch: ghost clipping's optimizer clips inside Opacus' "
                             "loss wrapper, flat clipping only")
        if (fed := self.setting.federated) is not None:
            if self.training.ema is not None or self.training.polyak_epochs:
                raise ValueError("training.ema and training.polyak_epochs are for central runs:"
                                 " averaging a federated site's weights is not built")
            if self.training.lr_schedule != LRScheduleConfig():
                raise ValueError("training.lr_schedule is for central runs: a schedule over a "
                                 "federated site's local steps is not built")
            if (fed.dp_mode == "none") == self.privacy.enabled:
                raise ValueError("setting.federated.dp_mode=none goes with privacy.enabled=false"
                                 " and sample/site/svt with privacy.enabled=true")
            if fed.dp_mode == "svt" and self.privacy.target_epsilon is None:
                raise ValueError("setting.federated.dp_mode=svt needs privacy.target_epsilon "
                                 "(ε of each site over all rounds; .inf = no noise)")
            if fed.dp_mode == "site" and fed.strategy == "fedadam":
                raise ValueError("setting.federated.dp_mode=site needs fedavg or fedprox: the "
                                 "noise is added to the aggregate, which FedAdam rescales")
        _check_registries(self)
        return self

    def run_id(self) -> str:
        """Canonical hash of everything that determines the result; an audit's id is the
        audited run's, ``-audit-KIND-mM`` and its faults appended (its record sits beside)."""
        if self.audit is not None:
            return f"{self.model_copy(update={'audit': None}).run_id()}-{self.audit.tag()}"
        data = self.model_dump(mode="json", exclude={"tracking", "output", "name", "audit"})
        if data["setting"].get("federated") is None:  # central run ids predate the field
            data["setting"].pop("federated", None)
        else:  # the testbed's link profiles shape the machine, not the run
            data["setting"]["federated"].pop("links", None)
        if not data["privacy"]["enabled"]:  # no DP noise: its seed determines nothing
            data["privacy"].pop("noise_seed", None)
        for (*path, key), default in _ADDED_LATER.items():  # keep earlier runs' ids
            node = data
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and key in node and node[key] == default:
                node.pop(key)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: fields added after runs were recorded: at these values they leave the run id unchanged
_ADDED_LATER = {
    ("training", "channels_last"): False,
    ("training", "val_subjects"): None,
    ("training", "ema"): None,
    ("training", "polyak_epochs"): 0,
    ("training", "augment"): {"flip": False, "affine": 0.0, "intensity": 0.0},
    ("training", "lr_schedule"): {"kind": "constant", "warmup_fraction": 0.0,
                                  "min_lr_fraction": 0.0, "milestones": [0.5, 0.75],
                                  "gamma": 0.1},
    ("privacy", "noise_seed"): None,
    ("model", "recipe"): None,
    ("privacy", "clipping"): "flat",
    ("privacy", "auto_clip_gamma"): 0.01,
    ("setting", "federated", "secagg_num_shares"): None,
    ("setting", "federated", "secagg_reconstruction_threshold"): None,
    ("setting", "federated", "secagg_clipping_range"): 8.0,
    ("setting", "federated", "secagg_quantization_range"): 2**22,
    ("setting", "federated", "min_fit_sites"): None,
    ("setting", "federated", "svt_clip"): 1e-3,
    ("setting", "federated", "svt_threshold"): 1e-4,
    ("setting", "federated", "svt_release_share"): 0.5,
    ("setting", "federated", "share_fraction"): 1.0,
    ("setting", "federated", "share_rule"): "topk",
}


def _check_registries(cfg: RunConfig) -> None:
    from privseg.architectures import get_entry, validate_knobs
    from privseg.datasets import get_dataset_entry

    try:
        ds = get_dataset_entry(cfg.dataset.name)
    except KeyError as e:
        raise ValueError(f"dataset.name: {e.args[0]}") from None
    try:
        ds.options(**cfg.dataset.options)
    except ValidationError as e:
        allowed = ", ".join(ds.options.model_fields) or "none"
        raise ValueError(f"dataset.options: {_format_errors(e, 'dataset.options')} — the "
                         f"options of dataset {ds.name!r} are: {allowed} (options left over "
                         "from a base config for another dataset?)") from None
    if cfg.dataset.dims not in ds.dims:
        raise ValueError(f"dataset.dims: {ds.name} supports {ds.dims}")
    try:
        entry = get_entry(cfg.model.name)
        validate_knobs(cfg.model.name, cfg.model.options)
    except (KeyError, ValueError) as e:
        raise ValueError(f"model: {e.args[0]}") from None
    if cfg.dataset.dims not in entry.spatial_dims:
        raise ValueError(f"model.name: {entry.name} supports dims {entry.spatial_dims}")
    if cfg.privacy.enabled and cfg.privacy.grad_sample_mode not in entry.dp_modes:
        raise ValueError(
            f"privacy.grad_sample_mode: {entry.name} passed the per-sample-gradient check only "
            f"in {', '.join(entry.dp_modes)}"
        )


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(e["loc"]))
        msg = e["msg"]
        if e["type"] == "value_error" and "error" in (e.get("ctx") or {}):
            msg = str(e["ctx"]["error"])  # our own message, without pydantic's prefix
            if not loc:
                lines.append(msg)
                continue
        if e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"][:-1]) if not prefix else None
            msg = ("unknown key" if parent is None else
                   f"unknown key; allowed keys here: {', '.join(parent.model_fields)}")
        lines.append(f"{loc or '(top level)'}: {msg}")
    return "; ".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def parse_config(data: dict, source: str = "config") -> RunConfig:
    """Validate a config mapping; raise :class:`ConfigError` naming every bad key."""
    from privseg.recipes import apply_recipe

    try:
        data = apply_recipe(data or {})
    except KeyError as e:
        raise ConfigError(f"{source}: {e.args[0]}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_errors(e)}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a config mapping."""
    data = json.loads(json.dumps(data or {}))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def builtin_configs() -> dict[str, Path]:
    """Built-in configs shipped inside the package, by name."""
    root = resources.files("privseg") / "configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or the path of the built-in config of that name."""
    p = Path(name_or_path)
    if p.exists():
        return p
    builtin = builtin_configs()
    key = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if key in builtin:
        return builtin[key]
    raise ConfigError(
        f"{name_or_path}: no such file and no built-in config of that name; "
        f"built-in: {', '.join(sorted(builtin))}"
    )


def read_config_mapping(path: Path) -> dict:
    """The YAML mapping in ``path``; a ConfigError names the file when it is not one.

    An empty file is refused too: every key would take its default, which is never what a
    config file was written for.
    """
    if Path(path).is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if data is None:
        raise ConfigError(f"{path}: empty config (no keys); see `privseg configs` for examples")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config from a YAML file or built-in name."""
    path = resolve_config_path(name_or_path)
    data = read_config_mapping(path)
    source = str(path)
    if overrides:
        parse_config(data, source=source)  # a fault in the file is named as the file's
        data, source = apply_overrides(data, overrides), f"{path} with --set {' '.join(overrides)}"
    return parse_config(data, source=source)
