"""Training configuration: frozen dataclasses loaded from a TOML file, validated, fingerprinted.

A config file has the sections [model], [corpus] (with the optional [corpus.generation] table), [activations],
[sae], [training], [eval] and the optional [meta_sae] (meta-SAE regularised training; absent means off); every
key is optional except `stack.hookpoints` (and `meta_sae.lambda_per_dim` in a [meta_sae] table). Unknown
sections or keys are refused with the list of valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.config import ModelConfig
from core.sae.base import SAEConfig
from core.sae.registry import ARCHITECTURES
from core.stack.dashboards import LIMITS as DASHBOARD_LIMITS
from trainer.data.generation_settings import GenerationSettings
from trainer.data.mixing import parse_mix, uses_generated


@dataclass(frozen=True)
class ModelSection:
    name: str = "default"
    device: str = "auto"
    dtype: str = "float32"
    """Host model dtype while collecting activations (fp32 keeps the statistics exact on CPU)."""

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(name=self.name, device=self.device, dtype=self.dtype)

    @classmethod
    def from_model_config(cls, model: ModelConfig) -> ModelSection:
        return cls(name=model.name, device=model.device, dtype=model.dtype)


@dataclass(frozen=True)
class CorpusSection:
    spec: str = "default"
    """One source or a weighted mix (trainer/data/mixing.py): 'default'/'pydocs', 'generated', a file or a
    directory, e.g. "generated:0.7,pydocs:0.3" (weights are shares of characters)."""
    text_field: str = "text"
    calibration_fraction: float = 0.05
    eval_fraction: float = 0.05
    split_seed: int = 0
    """Seeds the per-document split hash and the mix's document order."""
    generation: GenerationSettings | None = None
    """The [corpus.generation] table: how the 'generated' source is sampled (absent: the defaults)."""

    def __post_init__(self) -> None:
        parse_mix(self.spec)  # malformed specs, negative or all-zero weights fail when the config loads

    def effective_generation(self) -> GenerationSettings:
        return self.generation or GenerationSettings()

    def recorded(self) -> dict[str, Any]:
        """The section as fingerprinted and recorded: generation settings only when the spec samples (then the
        effective ones), so configs without the generated source keep their fingerprints."""
        data = asdict(self)
        data.pop("generation")
        if uses_generated(self.spec):
            data["generation"] = self.effective_generation().to_dict()
        return data


@dataclass(frozen=True)
class ActivationSection:
    context_length: int = 128
    batch_size: int = 8
    """Context windows per host-model forward pass."""
    max_tokens: int = 200_000
    """Training tokens collected per hookpoint (all hookpoints share one pass)."""
    dtype: str = "float32"
    """Shard dtype on disk: float32, float16 or bfloat16."""
    shard_tokens: int = 65_536
    store: str = ""
    """Activation store directory shared by several runs (e.g. a sweep); empty means OUT/activations.
    A store is reused only when it was collected with identical model, corpus and activation settings."""


@dataclass(frozen=True)
class StackSection:
    name: str = "stack"
    hookpoints: tuple[str, ...] = ()
    residualize: bool = False
    """ReSAE: stage m+1 trains on the scaled residual of an affine prediction from stage m's hookpoint."""
    calibration_tokens: int = 100_000
    """Tokens of the calibration split collected to fit the affine maps (residualize only)."""
    error_predictors: bool = False
    """Fit per-stage error-norm probes on held-out calibration tokens after training and store them in the
    stack (trainer/training/error_predictors.py), so the service reports predicted error norms."""
    error_predictor_tokens: int = 0
    """Calibration tokens for the probes; 0 means calibration_tokens (the ReSAE calibration store is reused)."""


@dataclass(frozen=True)
class SAESection:
    """The SAE of every stage; defaults are SAEConfig's, so the two never drift apart."""

    architecture: str = "topk"
    width: int = 0
    """Latents per stage (d_sae); 0 means expansion_factor × d_in."""
    expansion_factor: int = 8
    k: int = SAEConfig.k
    sparsity_coefficient: float = SAEConfig.sparsity_coefficient
    aux_k: int = SAEConfig.aux_k
    aux_k_coefficient: float = SAEConfig.aux_k_coefficient
    threshold_init: float = SAEConfig.threshold_init
    bandwidth: float = SAEConfig.bandwidth
    per_side_thresholds: bool = SAEConfig.per_side_thresholds
    tied_magnitude: bool = SAEConfig.tied_magnitude
    aux_reconstruction: bool = SAEConfig.aux_reconstruction
    sparsity_coefficients: tuple[float, ...] = ()
    """One λ per stage, overriding sparsity_coefficient: residual (ReSAE) stages and different hookpoints
    reach very different L0s at one λ (the first demo stack: 50 / 135 / 311 / 269 at λ 2)."""

    def sae_config(self, d_in: int, stage: int = 0) -> SAEConfig:
        """The SAEConfig of stage `stage`, reading a d_in-wide hookpoint."""
        shared = {f.name: getattr(self, f.name) for f in fields(SAEConfig) if hasattr(self, f.name)}
        if self.sparsity_coefficients:
            shared["sparsity_coefficient"] = self.sparsity_coefficients[stage]
        return SAEConfig(d_in=d_in, d_sae=self.width or self.expansion_factor * d_in, **shared)


@dataclass(frozen=True)
class TrainingSection:
    batch_size: int = 1024
    """Tokens per optimiser step."""
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_decay_fraction: float = 0.2
    sparsity_warmup_steps: int = 200
    token_budget: int = 0
    """Tokens each stage trains on; 0 means one pass over the collected activations."""
    buffer_tokens: int = 65_536
    dead_after_tokens: int = 100_000
    checkpoint_every: int = 500
    """Optimiser steps between checkpoints (resume point after an interruption)."""
    seed: int = 0
    history_every: int = 0
    """Steps between entries of each stage's training history in report.json (loss, L0, FVE and the dead fraction
    over each of `history_windows`); 0 = no history. Observation only: training is the same with or without it."""
    history_windows: tuple[int, ...] = (100_000,)
    """Trailing windows (tokens) of the history's dead fractions: a latent is dead over W when it fired on none of
    the last W training tokens (counted without the revivals `dead_after_tokens` triggers)."""


@dataclass(frozen=True)
class EvalSection:
    max_tokens: int = 8_192
    """Held-out tokens for reconstruction metrics."""
    ce_windows: int = 16
    """Held-out context windows for the CE/KL splice metrics."""
    probing: bool = False
    """Run the sparse-probing suite (trainer/evaluation/probe_tasks.py, probing.py) on each stage's codes."""


@dataclass(frozen=True)
class DistributedSection:
    """How `torchrun` ranks share the work (trainer/training/distributed.py); ignored by a single process."""

    mode: str = "data"
    """"data": each rank trains every stage on its share of each batch (gradients all-reduced);
    "stages": rank r trains stages r, r+N, ... on full batches."""

    def __post_init__(self) -> None:
        if self.mode not in ("data", "stages"):
            raise ValueError(f"distributed.mode must be 'data' or 'stages', got {self.mode!r}")


@dataclass(frozen=True)
class MetaSAESection:
    """Meta-SAE regularised training (docs/methods.md §D), for every stage; the section's presence
    switches it on. `lambda_per_dim` is the paper's λ₂, so its 0.3 means what it means there."""

    lambda_per_dim: float
    """λ₂ on the paper's per-dimension scale (required: there is no default, see RETIRED_META_KEYS). The paper's
    loss is mean_{tokens, dims}(x − x̂)² + λ₂·mean_i p_i; ours sums squared error over the d_in dimensions
    (E‖x‖² = d_in, like the paper's unit-variance inputs), i.e. is d_in times the paper's, so the primary loss
    adds d_in·λ₂·mean_i p_i (trainer/training/meta_sae.py: penalty_weight). The paper's best is 0.3."""
    width: int = 256
    """Meta-latents m (≪ the primary width; the paper uses ≈9%)."""
    k: int = 4
    """Mean active meta-latents per decoder row (BatchTopK)."""
    sigma2: float = 1.0
    """σ² of the penalty's kernel exp(−‖d_i − meta(d_i)‖²/σ²) over unit rows (no d_in scaling: as in the paper)."""
    primary_steps: int = 10
    """Primary optimiser steps per phase (the meta-SAE is a frozen critic meanwhile)."""
    meta_steps: int = 5
    """Meta-SAE steps per phase, each on all current decoder rows."""

    def __post_init__(self) -> None:
        for name in ("width", "k", "primary_steps", "meta_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"meta_sae.{name} must be an integer >= 1, got {value!r}")
        if self.k > self.width:
            raise ValueError(f"meta_sae.k must be <= meta_sae.width ({self.width}), got {self.k}")
        finite = [isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (self.lambda_per_dim, self.sigma2)]
        if not finite[0] or self.lambda_per_dim < 0:
            raise ValueError(f"meta_sae.lambda_per_dim must be a finite number >= 0, got {self.lambda_per_dim!r}")
        if not finite[1] or self.sigma2 <= 0:
            raise ValueError(f"meta_sae.sigma2 must be a finite number > 0, got {self.sigma2!r}")


RETIRED_META_KEYS = ("lambda", "lambda_")
"""[meta_sae] `lambda` (stored as `lambda_`) weighed the penalty against our summed-over-d_in loss, d_in times less
than the paper's λ₂ at the same number. It is refused rather than reinterpreted, and `lambda_per_dim` has no
default, so no existing config (nor a stored run's config, when the report decides what to reuse) can silently
change meaning."""


def _check_meta_lambda(values: dict[str, Any], allowed: set[str]) -> None:
    """Refuse the retired `lambda`, saying how to convert it, and require λ₂ (after a typo's own error)."""
    retired = [key for key in RETIRED_META_KEYS if key in values]
    if retired:
        old = values[retired[0]]
        same = f"{old / 640:.6g}" if isinstance(old, int | float) and not isinstance(old, bool) else "lambda / 640"
        raise ValueError(
            f"meta_sae.{retired[0]} is retired: it weighed the penalty against the reconstruction loss summed over "
            f"the d_in dimensions, d_in times less than the paper's λ₂ at the same number. Use "
            f"meta_sae.lambda_per_dim, λ₂ on the paper's per-dimension scale (its best is 0.3). For the same "
            f"training as before multiply by 1/d_in: lambda_per_dim = lambda / d_in, d_in the hookpoint width "
            f"(Gemma 3 270M's 640: {retired[0]} = {old!r} becomes lambda_per_dim = {same}); for the paper's "
            f"setting, lambda_per_dim = 0.3")
    if "lambda_per_dim" not in values and set(values) <= allowed:
        raise ValueError("meta_sae.lambda_per_dim is required (λ₂ on the paper's per-dimension scale, e.g. 0.3, its "
                         "best); it has no default, so a config written for the retired meta_sae.lambda cannot "
                         "silently change meaning")


@dataclass(frozen=True)
class DashboardSection:
    """Feature dashboards computed as the last step of `train`, as `featurewire-train dashboards` does later."""

    tokens: int = 50_000
    """Held-out tokens the pass reads."""
    top_n: int = 20
    context: int = 10
    quantiles: int = 5
    per_quantile: int = 4

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"dashboards.tokens must be >= 1, got {self.tokens}")
        for name in ("top_n", "context", "quantiles", "per_quantile"):
            low = 0 if name == "context" else 1
            if not low <= getattr(self, name) <= DASHBOARD_LIMITS[name]:
                raise ValueError(f"dashboards.{name} must be in [{low}, {DASHBOARD_LIMITS[name]}], "
                                 f"got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    activations: ActivationSection = field(default_factory=ActivationSection)
    stack: StackSection = field(default_factory=StackSection)
    sae: SAESection = field(default_factory=SAESection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    meta_sae: MetaSAESection | None = field(default=None, metadata={"section": MetaSAESection})
    """Absent (None) unless the config has a [meta_sae] table."""
    distributed: DistributedSection | None = field(default=None, metadata={"section": DistributedSection})
    """Absent (None: data mode) unless the config has a [distributed] table."""
    dashboards: DashboardSection | None = field(default=None, metadata={"section": DashboardSection})
    """Absent (None: no dashboards) unless the config has a [dashboards] table; not part of the fingerprint (it
    changes nothing that is trained)."""

    def __post_init__(self) -> None:
        if not self.stack.hookpoints:
            raise ValueError("stack.hookpoints must name at least one hookpoint, e.g. ['blocks.6.hook_resid_post']")
        if len(set(self.stack.hookpoints)) != len(self.stack.hookpoints):
            raise ValueError("stack.hookpoints must not repeat a hookpoint")
        if self.sae.architecture not in ARCHITECTURES:
            choices = ", ".join(ARCHITECTURES)
            raise ValueError(f"sae.architecture {self.sae.architecture!r} unknown; choose one of {choices}")
        positive = {
            "activations.context_length": self.activations.context_length,
            "activations.batch_size": self.activations.batch_size,
            "activations.max_tokens": self.activations.max_tokens,
            "training.batch_size": self.training.batch_size,
            "training.checkpoint_every": self.training.checkpoint_every,
            "sae.k": self.sae.k,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.stack.residualize and len(self.stack.hookpoints) < 2:
            raise ValueError("stack.residualize needs at least two hookpoints (stage 0 is plain, the rest residual)")
        if self.stack.calibration_tokens < 1:
            raise ValueError(f"stack.calibration_tokens must be >= 1, got {self.stack.calibration_tokens}")
        if self.stack.error_predictor_tokens < 0:
            raise ValueError(f"stack.error_predictor_tokens must be >= 0, got {self.stack.error_predictor_tokens}")
        per_stage = self.sae.sparsity_coefficients
        if per_stage and (len(per_stage) != len(self.stack.hookpoints) or min(per_stage) < 0):
            raise ValueError(f"sae.sparsity_coefficients needs one value >= 0 per hookpoint "
                             f"({len(self.stack.hookpoints)}), got {list(per_stage)}")
        if self.training.lr <= 0:
            raise ValueError(f"training.lr must be > 0, got {self.training.lr}")
        if self.training.history_every < 0:
            raise ValueError(f"training.history_every must be >= 0 (0: no history), got {self.training.history_every}")
        if not self.training.history_windows or min(self.training.history_windows) < 1:
            raise ValueError(f"training.history_windows needs at least one window >= 1 token, "
                             f"got {list(self.training.history_windows)}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["corpus"] = self.corpus.recorded()
        for optional in ("meta_sae", "distributed", "dashboards"):
            if data.get(optional) is None:
                data.pop(optional, None)  # configs without it keep their fingerprint
        if not data["sae"]["sparsity_coefficients"]:
            del data["sae"]["sparsity_coefficients"]  # likewise
        if not data["stack"]["error_predictors"] and not data["stack"]["error_predictor_tokens"]:
            del data["stack"]["error_predictors"], data["stack"]["error_predictor_tokens"]  # likewise
        if not data["training"]["history_every"]:
            del data["training"]["history_every"], data["training"]["history_windows"]  # likewise
        return data

    def fingerprint(self) -> str:
        """Hash of the canonical JSON: a resumed run must match the config it started with ([dashboards] aside)."""
        data = {k: v for k, v in self.to_dict().items() if k != "dashboards"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def collection_fingerprint(self) -> str:
        """Hash of just what determines the collected activations (reused across SAE sweeps)."""
        parts = {"model": asdict(self.model), "corpus": self.corpus.recorded(),
                 "activations": asdict(self.activations), "hookpoints": list(self.stack.hookpoints)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_SECTIONS = {f.name: f.metadata.get("section", f.default_factory) for f in fields(TrainConfig)}  # type: ignore[misc]


def _section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTIONS[name]
    allowed = {f.name for f in fields(cls)}
    if name == "meta_sae":
        _check_meta_lambda(values, allowed)
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in [{name}]; allowed: {', '.join(sorted(allowed))}")
    if name == "corpus" and "generation" in values:
        if not isinstance(values["generation"], dict):
            raise ValueError("[corpus] generation must be a table ([corpus.generation])")
        values = {**values, "generation": GenerationSettings.from_dict(dict(values["generation"]))}
    if name == "stack" and "hookpoints" in values:
        values = {**values, "hookpoints": tuple(values["hookpoints"])}
    if name == "training" and "history_windows" in values:
        values = {**values, "history_windows": tuple(int(v) for v in values["history_windows"])}
    if name == "sae" and "sparsity_coefficients" in values:
        values = {**values, "sparsity_coefficients": tuple(float(v) for v in values["sparsity_coefficients"])}
    return cls(**values)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; allowed: {', '.join(_SECTIONS)}")
    return TrainConfig(**{name: _section(name, dict(values)) for name, values in data.items()})


def load_config(path: str | Path) -> TrainConfig:
    """Parse and validate a TOML training config; errors name the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
