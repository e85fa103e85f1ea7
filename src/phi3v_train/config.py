"""One typed config tree for a training run.

Precedence: dataclass defaults <- YAML recipe (``configs/train/*.yaml``) <- ``key=value``
overrides on the command line (``optim.lr=2e-5 packing.max_seq_len=16384``). Unknown keys
fail with the list of valid ones. The resolved tree is written to ``<run_dir>/config.yaml``.
The DeepSpeed dict is derived from it (:func:`build_deepspeed_config`), so batch sizes,
precision and clipping cannot disagree between the two.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what to change."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Architecture: "tiny" (configs/model/tiny.json), "phi-3-vision-128k-instruct",
    "phi-3.5-vision-instruct", or a path to an official-style config.json (or its directory)."""
    pretrained: str | None = None
    """Directory of an official (or exported) checkpoint to load weights from; None = random init."""
    attn_implementation: str = "sdpa"
    """eager | sdpa | flex_attention | flash_attention_2 (needs the flash-attn package)."""
    gradient_checkpointing: bool = False
    """Recompute LM and CLIP layer activations in backward (non-reentrant) to save memory."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the chunked cross-entropy; logits are never held for more than this."""

    def __post_init__(self):
        valid = {"eager", "sdpa", "flex_attention", "flash_attention_2"}
        if self.attn_implementation not in valid:
            raise ConfigError(f"model.attn_implementation={self.attn_implementation!r}: use one of {sorted(valid)}")
        if self.loss_chunk_size <= 0:
            raise ConfigError("model.loss_chunk_size must be > 0 (tokens)")


@dataclass
class DataConfig:
    shards: str = "runs/shards"
    """Directory holding manifest.json (written by `phi3v-train shards`), or a shard URL pattern
    (glob, brace pattern or `pipe:` command) for the training split."""
    val_shards: str | None = None
    """Shard URL pattern for the validation split; None = the manifest's val split."""
    num_crops: int | None = None
    """HD-transform crop budget per image; None = the model config's default (16 for 3-V, 4 for 3.5-V)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 64
    """Samples held in the shuffle buffer of each worker."""
    split_shards_by_rank: bool = False
    """Give each rank its own disjoint shard subset (shard i -> rank i % world) instead of
    resampling all shards on every rank."""

    def __post_init__(self):
        if self.num_crops is not None and self.num_crops < 1:
            raise ConfigError("data.num_crops must be >= 1 (or null for the model default)")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")


@dataclass
class PackingConfig:
    max_seq_len: int = 4096
    """Tokens per packed sequence (text + image tokens of all samples in it, plus padding)."""
    buffer_size: int = 64
    """Samples buffered by the packer before best-fit-decreasing packs them."""

    def __post_init__(self):
        if self.max_seq_len < 16:
            raise ConfigError("packing.max_seq_len must be >= 16 tokens")
        if self.buffer_size < 1:
            raise ConfigError("packing.buffer_size must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 2e-5
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0 to lr."""
    max_steps: int = 100
    """Optimizer steps in the run."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value (0 = off)."""
    micro_batch_size: int = 1
    """Packed sequences per rank per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    global_batch_size: int | None = None
    """Packed sequences per optimizer step over all ranks; if set it must equal
    micro_batch_size * gradient_accumulation_steps * data-parallel size."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0 or self.max_steps < 1 or self.warmup_steps < 0:
            raise ConfigError("optim: need lr > 0, max_steps >= 1, warmup_steps >= 0")
        if self.micro_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("optim.micro_batch_size and optim.gradient_accumulation_steps must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio must be in [0, 1]")


@dataclass
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero3.json"
    """JSON with the ZeRO-3 specifics (zero_optimization etc.); batch sizes, precision,
    clipping and the optimizer are filled in from this config tree and must not be set there."""
    precision: str = "bf16"
    """bf16 | fp32 (fp32 is for exactness tests on CPU)."""
    torch_adam: bool = True
    """Use torch's AdamW inside DeepSpeed (no compiled op: right on CPU; set false on GPU for FusedAdam)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-Offload)."""

    def __post_init__(self):
        if self.precision not in {"bf16", "fp32"}:
            raise ConfigError(f"deepspeed.precision={self.precision!r}: use bf16 or fp32")


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Optimizer steps between log lines (device syncs happen only then)."""
    wandb: bool = False
    """Log to Weights & Biases too (offline mode unless WANDB_API_KEY is set)."""
    wandb_project: str = "phi3v-train"
    """W&B project name."""

    def __post_init__(self):
        if self.log_every < 1:
            raise ConfigError("logging.log_every must be >= 1")


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted."""
    resume: bool = True
    """Resume from <run_dir>/checkpoints/latest when it exists."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, logs and checkpoints of this run go."""
    seed: int = 0
    """Seed for model init and data order."""
    process_group_timeout_s: int = 600
    """Seconds a collective may wait before the job fails instead of hanging."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ConfigError listing valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(prefix + k for k in unknown)}; valid keys: {sorted(prefix + n for n in names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a leaf value to its annotated type (YAML reads ``5e-4`` as a string)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    return value


def _parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, null, lists)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (in place) and return it.

    Raises:
        ConfigError: an override is not of the form key=value.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Load defaults <- YAML file <- overrides into a validated :class:`TrainConfig`.

    Raises:
        ConfigError: unknown keys (the message lists the valid ones) or invalid values.
        FileNotFoundError: the YAML file does not exist.
    """
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    data = apply_overrides(data, list(overrides))
    try:
        return _from_dict(TrainConfig, data)
    except TypeError as e:  # wrong value type reaching a dataclass
        raise ConfigError(str(e)) from e


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as a plain nested dict (YAML/JSON serialisable)."""
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else relative to the repository root (bundled configs)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p


FORBIDDEN_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "bf16", "fp16", "gradient_clipping", "optimizer", "scheduler")


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict: ZeRO specifics from ``cfg.deepspeed.config``, the rest from ``cfg``.

    Raises:
        ConfigError: the JSON sets a key this tree owns (batch sizes, precision, clipping,
            optimizer, scheduler), or global_batch_size disagrees with micro x accumulation x world.
    """
    path = resolve_path(cfg.deepspeed.config)
    if not path.exists():
        raise ConfigError(f"deepspeed.config: {path} does not exist")
    ds = json.loads(path.read_text())
    clash = [k for k in FORBIDDEN_DS_KEYS if k in ds]
    if clash:
        raise ConfigError(f"{path} sets {clash}: remove them, they come from the config tree "
                          "(optim.* and deepspeed.precision)")
    o = cfg.optim
    global_batch = o.micro_batch_size * o.gradient_accumulation_steps * world_size
    if o.global_batch_size is not None and o.global_batch_size != global_batch:
        raise ConfigError(
            f"optim.global_batch_size={o.global_batch_size} but micro_batch_size({o.micro_batch_size}) x "
            f"gradient_accumulation_steps({o.gradient_accumulation_steps}) x data-parallel size({world_size}) "
            f"= {global_batch}: change one of them")
    ds.update({
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": cfg.deepspeed.torch_adam}},
    })
    if cfg.deepspeed.offload_optimizer:
        ds.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu"}
    return ds


def lr_at(step: int, o: OptimConfig) -> float:
    """Learning rate multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine
    decay from 1 to ``min_lr_ratio`` at ``max_steps``."""
    if step < o.warmup_steps:
        return (step + 1) / (o.warmup_steps + 1)
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
