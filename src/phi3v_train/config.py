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
    loss_impl: str = "auto"
    """auto (Liger's fused linear cross-entropy on CUDA when installed, else chunked) | chunked | liger."""
    freeze_vision: bool = False
    """Freeze the CLIP tower (img_processor)."""
    freeze_projector: bool = False
    """Freeze img_projection and the glb_GN/sub_GN separators."""
    freeze_lm: bool = False
    """Freeze the language model (layers, norm, lm_head and the text embedding)."""

    def __post_init__(self):
        valid = {"eager", "sdpa", "flex_attention", "flash_attention_2"}
        if self.attn_implementation not in valid:
            raise ConfigError(f"model.attn_implementation={self.attn_implementation!r}: use one of {sorted(valid)}")
        if self.loss_chunk_size <= 0:
            raise ConfigError("model.loss_chunk_size must be > 0 (tokens)")
        if self.loss_impl not in {"auto", "chunked", "liger"}:
            raise ConfigError(f"model.loss_impl={self.loss_impl!r}: use auto, chunked or liger")
        if self.freeze_vision and self.freeze_projector and self.freeze_lm:
            raise ConfigError("model.freeze_*: everything is frozen, nothing would train")


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
    """DataLoader worker processes per rank (0 = load in the training process); must divide
    num_streams. Not part of the data order: a resume may change it."""
    num_streams: int = 8
    """Independent sample sub-streams per rank (each: its own shard draws, shuffle and packer),
    shared evenly by the workers. Part of the data order: keep it across resumes."""
    shuffle_buffer: int = 64
    """Undecoded samples held in the shuffle buffer of each sub-stream."""
    pixel_dtype: str = "auto"
    """dtype of the batches' pixel_values: auto (bfloat16 when deepspeed.precision=bf16, the values
    the vision tower's first cast makes anyway, at half the bytes to move; else float32) |
    float32 | bfloat16."""
    split_shards_by_rank: bool = False
    """Give each rank its own disjoint shard subset (shard i -> rank i % world) instead of
    resampling all shards on every rank."""

    def __post_init__(self):
        if self.num_crops is not None and self.num_crops < 1:
            raise ConfigError("data.num_crops must be >= 1 (or null for the model default)")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if self.pixel_dtype not in {"auto", "float32", "bfloat16"}:
            raise ConfigError(f"data.pixel_dtype={self.pixel_dtype!r}: use auto, float32 or bfloat16")
        if self.num_streams < 1 or self.num_streams % max(1, self.num_workers):
            raise ConfigError(f"data.num_workers={self.num_workers} must divide data.num_streams={self.num_streams}: "
                              "the workers share the sub-streams evenly (e.g. num_streams=8 with 1, 2, 4 or 8 workers)")


@dataclass
class PackingConfig:
    max_seq_len: int = 4096
    """Tokens per packed sequence (text + image tokens of all samples in it, plus padding)."""
    buffer_size: int = 64
    """Samples buffered by the packer before best-fit-decreasing packs them."""
    check_sample_lengths: int = 2000
    """Shard records whose token length (text + image tokens, from the record's image size) is
    checked against max_seq_len before launch; a longer one is a configuration error, since the
    stream would silently drop it. 0 = skip the check (over-long samples are then dropped and
    counted)."""
    enabled: bool = True
    """Pack several samples per sequence; false = one sample per sequence, padded to max_seq_len
    (the unpacked baseline `phi3v-train bench` compares against)."""
    overlong: str = "drop"
    """A sample longer than max_seq_len: "drop" (skipped and counted) or "truncate" (text only,
    never inside an image; a sample whose images alone do not fit is still dropped)."""
    strategy: str = "best_fill"
    """best_fill (each pack is the buffer subset that fills it best) | bfd (best-fit-decreasing)."""
    padding: str = "longest"
    """Row length of a micro batch: "longest" (its longest pack rounded up to pad_to_multiple_of:
    no compute on the room whole samples leave in a pack) | "max_length" (every row max_seq_len:
    static shapes). max_seq_len bounds memory either way."""
    pad_to_multiple_of: int = 64
    """padding=longest: row lengths are multiples of this many tokens (1 = exact)."""
    max_images_per_pack: int | None = None
    """Cap on images per pack (null: only max_seq_len caps a pack)."""
    pad_images_to: int | None = None
    """Equal image count per micro batch: every pack is padded with blank images (a global view
    and one sub-crop, label -100, 313 tokens each at 336 px) to exactly this many images, so every
    rank runs the vision tower on as many images (its crops still follow the real images' sizes);
    packs keep room for them (null: off)."""

    def __post_init__(self):
        if self.max_seq_len < 16:
            raise ConfigError("packing.max_seq_len must be >= 16 tokens")
        if self.buffer_size < 1:
            raise ConfigError("packing.buffer_size must be >= 1")
        if self.check_sample_lengths < 0:
            raise ConfigError("packing.check_sample_lengths must be >= 0 (records; 0 = off)")
        if self.overlong not in {"drop", "truncate"}:
            raise ConfigError(f"packing.overlong={self.overlong!r}: use drop or truncate")
        if self.strategy not in {"best_fill", "bfd"}:
            raise ConfigError(f"packing.strategy={self.strategy!r}: use best_fill or bfd")
        if self.padding not in {"longest", "max_length"}:
            raise ConfigError(f"packing.padding={self.padding!r}: use longest or max_length")
        if self.pad_to_multiple_of < 1:
            raise ConfigError("packing.pad_to_multiple_of must be >= 1 token")
        for name in ("max_images_per_pack", "pad_images_to"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"packing.{name} must be >= 1 image (or null: off)")


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
    max_nonfinite_steps_in_row: int = 5
    """A step whose loss or gradient norm is NaN/inf is skipped (no update, counted in the
    metrics); this many skipped steps in a row stop the run with an error (exit code 5)."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0 or self.max_steps < 1 or self.warmup_steps < 0:
            raise ConfigError("optim: need lr > 0, max_steps >= 1, warmup_steps >= 0")
        if self.micro_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("optim.micro_batch_size and optim.gradient_accumulation_steps must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio must be in [0, 1]")
        if self.max_nonfinite_steps_in_row < 1:
            raise ConfigError("optim.max_nonfinite_steps_in_row must be >= 1")


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
    wandb_mode: str = "auto"
    """auto: online when WANDB_API_KEY is set (or WANDB_MODE says so), else offline (files under
    <run_dir>/wandb, upload later with `wandb sync`); offline; online."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device for MFU; None = the table in flops.py (A100, H100, H200) from
    the GPU name. CPUs have no table entry: MFU is null on CPU unless this is set."""

    def __post_init__(self):
        if self.log_every < 1:
            raise ConfigError("logging.log_every must be >= 1")
        if self.wandb_mode not in {"auto", "offline", "online"}:
            raise ConfigError(f"logging.wandb_mode={self.wandb_mode!r}: use auto, offline or online")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError("logging.peak_tflops must be > 0 (TFLOP/s per device) or null")


@dataclass
class ProfilingConfig:
    enabled: bool = False
    """Run torch.profiler on a step schedule; traces per rank in <run_dir>/profile (profiling.py)."""
    wait: int = 5
    """Optimizer steps skipped before each profiling cycle."""
    warmup: int = 2
    """Steps recorded and discarded (profiler warm-up) before the active steps."""
    active: int = 3
    """Steps recorded into each trace."""
    repeat: int = 1
    """Profiling cycles (0 = until the end of the run)."""
    record_shapes: bool = False
    """Record operator input shapes (slower, bigger traces)."""
    profile_memory: bool = False
    """Record tensor allocations (memory timeline in the trace)."""
    with_stack: bool = False
    """Record Python stacks of operators (slow)."""

    def __post_init__(self):
        if self.wait < 0 or self.warmup < 0 or self.active < 1 or self.repeat < 0:
            raise ConfigError("profiling: need wait >= 0, warmup >= 0, active >= 1, repeat >= 0 (steps)")


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save every N optimizer steps (0 = only at the end). Also saved at the end, on
    SIGUSR1/SIGUSR2/SIGTERM (then the run stops, exit code 3) and when the file
    <run_dir>/SAVE_NOW appears (then the run goes on; the file is removed)."""
    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted."""
    resume: bool = True
    """Resume from <run_dir>/checkpoints/latest when it exists (the newest complete checkpoint
    if `latest` is missing or points to nothing)."""

    def __post_init__(self):
        if self.save_every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint: need save_every >= 0 (steps) and keep_last >= 1")


@dataclass
class DebugConfig:
    """Fault injection for the fault-tolerance tests; leave the defaults in real runs.
    Steps are 1-based optimizer steps."""
    nan_loss_steps: list[int] = field(default_factory=list)
    """Make the loss NaN on the last rank at these steps (the step must be skipped on all ranks)."""
    signal: str = "SIGUSR1"
    """Signal that `signal_step` sends (SIGUSR1, SIGUSR2 or SIGTERM)."""
    signal_step: int = 0
    """Rank `signal_rank` sends itself `signal` during this step (0 = never)."""
    signal_rank: int = 0
    """Rank that receives the injected signal."""
    kill_in_save_step: int = 0
    """Rank 0 kills itself (SIGKILL) while saving the checkpoint of this step, after every rank
    wrote its files but before the checkpoint is committed (0 = never)."""

    def __post_init__(self):
        if self.signal not in {"SIGUSR1", "SIGUSR2", "SIGTERM"}:
            raise ConfigError(f"debug.signal={self.signal!r}: use SIGUSR1, SIGUSR2 or SIGTERM")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, logs and checkpoints of this run go."""
    seed: int = 0
    """Seed for model init and data order."""
    process_group_timeout_s: int = 600
    """Seconds a collective may wait before the job fails instead of hanging (a dead or hung
    rank then makes the others exit with code 4, naming it)."""
    requeue_on_preemption: bool = True
    """After the preemption checkpoint, rank 0 runs `scontrol requeue $SLURM_JOB_ID` when under
    SLURM and not under submitit (which requeues by itself)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self):
        if self.process_group_timeout_s < 1:
            raise ConfigError("process_group_timeout_s must be >= 1 (seconds)")


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
    if typing.get_origin(hint) is list:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # key=3 for a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
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
    zero = ds.setdefault("zero_optimization", {})
    json_offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if json_offload and not cfg.deepspeed.offload_optimizer:
        raise ConfigError(f"{path} offloads the optimizer (zero_optimization.offload_optimizer) but "
                          "deepspeed.offload_optimizer=false: set deepspeed.offload_optimizer=true or remove it "
                          "from the JSON")
    if cfg.deepspeed.offload_optimizer and not json_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return ds


def validate_for_launch(cfg: TrainConfig, world_size: int) -> dict:
    """Every check that can fail a run, done before any process group starts (and cheap enough
    for every rank to repeat): the DeepSpeed dict (:func:`build_deepspeed_config`), the model
    config and ``model.pretrained`` directory, the shards, and ``packing.max_seq_len`` against
    the longest of the first ``packing.check_sample_lengths`` shard records.

    Returns:
        The DeepSpeed config dict.

    Raises:
        ConfigError: with what to change.
    """
    ds = build_deepspeed_config(cfg, world_size)
    from .model.config import load_model_config

    m = cfg.model
    if m.pretrained is not None:
        pre = Path(m.pretrained)
        if not (pre / "config.json").is_file():
            raise ConfigError(f"model.pretrained={m.pretrained}: no config.json there; pass the directory of an "
                              "official or exported checkpoint (`phi3v-train export`), or null for random init")
        if not any(pre.glob("*.safetensors")) and not any(pre.glob("*.bin")):
            raise ConfigError(f"model.pretrained={m.pretrained}: no *.safetensors weights there")
    try:
        mcfg = load_model_config(m.pretrained or m.name)
    except FileNotFoundError as e:
        raise ConfigError(f"model.name={m.name!r}: {e}") from None
    k = cfg.packing.pad_images_to
    if k is not None:
        from .model.processor import num_image_tokens

        p = num_image_tokens(mcfg.crop_size, mcfg.crop_size, mcfg.crop_size, mcfg.patch_size)
        if k * p >= cfg.packing.max_seq_len:
            raise ConfigError(f"packing.pad_images_to={k} blank images of {p} tokens fill a pack of "
                              f"packing.max_seq_len={cfg.packing.max_seq_len}: lower pad_images_to or raise max_seq_len")
    from .train import resolve_shards
    from .data.stream import expand_urls

    try:
        shards = expand_urls(resolve_shards(cfg.data.shards, "train"))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.shards={cfg.data.shards!r}: {e}") from None
    if cfg.data.split_shards_by_rank and len(shards) < world_size:
        raise ConfigError(f"data.split_shards_by_rank needs >= {world_size} shards (one per rank), "
                          f"{cfg.data.shards} has {len(shards)}: write more shards or set it false")
    if cfg.packing.check_sample_lengths and cfg.packing.overlong == "drop":  # truncation makes them fit
        _check_sample_lengths(cfg, mcfg, shards)
    return ds


def _check_sample_lengths(cfg: TrainConfig, mcfg, shards: list[str]) -> None:
    """ConfigError if a record among the first ``packing.check_sample_lengths`` of the local shards
    is longer than ``packing.max_seq_len`` tokens; lengths come from the record's text and image
    size (``num_tokens`` of the trainer's process_fn, what the stream packs on), no pixels read."""
    import tarfile

    from .model.processor import Phi3VProcessor
    from .train import make_process_fn

    processor = Phi3VProcessor.from_pretrained(num_crops=cfg.data.num_crops or mcfg.num_crops,
                                               crop_size=mcfg.crop_size, patch_size=mcfg.patch_size)
    num_tokens = make_process_fn(processor).num_tokens
    budget, longest, longest_key = cfg.packing.check_sample_lengths, 0, None
    for shard in shards:
        if "://" in shard or shard.startswith("pipe:") or not Path(shard).is_file():
            continue  # remote shards: not checked here
        with tarfile.open(shard) as tar:
            for member in tar:
                if budget <= 0:
                    break
                if not member.name.endswith(".json"):
                    continue
                budget -= 1
                try:
                    record = json.loads(tar.extractfile(member).read())
                    size = (int(record["image_width"]), int(record["image_height"])) if "image_width" in record else None
                    n = num_tokens(record, size)
                except (KeyError, ValueError, TypeError):
                    continue  # the stream skips and counts such records
                if n > longest:
                    longest, longest_key = n, record.get("key", member.name)
        if budget <= 0:
            break
    if longest > cfg.packing.max_seq_len:
        raise ConfigError(
            f"sample {longest_key!r} needs {longest} tokens (text + image tokens at num_crops="
            f"{processor.num_crops}) > packing.max_seq_len={cfg.packing.max_seq_len}: raise packing.max_seq_len to "
            f">= {longest}, lower data.num_crops, set packing.overlong=truncate, or packing.check_sample_lengths=0 to drop such samples")


def lr_at(step: int, o: OptimConfig) -> float:
    """Learning rate multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine
    decay from 1 to ``min_lr_ratio`` at ``max_steps``."""
    if step < o.warmup_steps:
        return (step + 1) / (o.warmup_steps + 1)
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
