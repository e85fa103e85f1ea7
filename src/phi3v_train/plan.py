"""Memory planner: per-device memory of a training configuration, from formulas (``phi3v-train plan``).

Model states (bytes per parameter P, N = data-parallel ranks; DeepSpeed's own estimators
``estimate_zero2/3_model_states_mem_needs`` give the same 16-18 bytes/param for bf16):

========== =============================================================== ==================
precision  per parameter                                                   ZeRO-3 total
bf16       param 2 (bf16) + fp32 master 4 + fp32 grad 4 + Adam m, v 8      18 P / N
fp32       param 4 + fp32 copy 4 (DeepSpeed clones the partition) + grad   20 P / N
           4 + Adam 8
========== =============================================================== ==================

Stage 0: everything replicated; stage 1: the optimizer part (master, fp32 grad, Adam)
divided by N; stage 2: as 1 (DeepSpeed keeps a full working-precision grad, like its estimator);
stage 3: all divided by N, plus the working set: the gathered current module and the prefetch
bucket (``stage3_prefetch_bucket_size``) in working precision, the module's full gradient before
its reduce-scatter, and the reduce bucket (``reduce_bucket_size``; on CPU only the pages
touched count: at most P elements). ``offload_optimizer``: the optimizer part goes to host
memory; ``offload_param`` (stage 3): the parameter partition too.

Activations (bytes per token, e = 2 for bf16, 4 for fp32). Counted from the tensors autograd
saves for backward (``torch.autograd.graph.saved_tensors_hooks``; ``tests/test_plan.py`` checks
these coefficients against a real ``Phi3DecoderLayer`` / ``CLIPEncoderLayer``):

- Phi-3 decoder layer: ``11 H e + 2 H 4 + 4 I e + 4 n_h + 8`` (q, k, v, attention output,
  norm inputs and their fp32 upcasts, gate/up, SiLU, product; the attention log-sum-exp).
  Eager attention adds the softmax probabilities: ``n_h L (4 + e)`` per token (e = 4: ``4 n_h L``).
  With gradient checkpointing only the layer input (``H e``) stays per layer, and one layer is
  recomputed during backward.
- CLIP layer (per vision token, 577 per crop): ``e (8 Dv + 3 Dff + 4) + 4 n_hv``; the
  ``num_hidden_layers - 1`` layers that run; checkpointed: ``Dv e`` per layer.
- Backward transients of the layer being differentiated: ``(4 I + 4 H) e`` per token.
- The chunked loss: one chunk's logits, its log-softmax and their gradients:
  ``12 n V`` bytes with n = min(loss_chunk_size, B L) (fp32 logits, whatever the precision);
  ``loss_chunk_size=None`` (no chunking) gives n = B L: 50 GB at 128K.
- Attention mask: SDPA/eager with packed rows build a [B, 1, L, L] mask (bool for SDPA, e bytes
  for eager): 17 GB at 128K; flash-attn varlen and FlexAttention need none (block mask: tiny).
  SDPA also converts it to an additive float mask in every layer and saves that for backward:
  ``L e`` more bytes per token per layer (34 GB per layer at 128K: ~1 TB without checkpointing).

Peak = states + ZeRO buffers + mask + saved activations (LM and vision: the vision tower runs
first and its activations live until the end of backward) + the larger of the loss peak and the
recomputed-layer + backward transients. This is what the allocator holds ("allocated"); CUDA adds
its context (~0.5-1 GiB) and the caching allocator's fragmentation ("reserved", often +5-15%).
Not modelled: sequence parallelism, activation offload, pinned host buffers.

Validation (``phi3v-train plan --validate``, ``tests/test_plan.py``): the tiny model in fp32 on
CPU, one process, built and trained for 2 AdamW steps at 2K-8K tokens with/without checkpointing,
SDPA and eager: measured peak RSS increase / planned = 0.96-1.04 (tolerance 0.85-1.15). The
per-layer activation coefficients are exact against autograd's saved tensors. In the full
DeepSpeed runs of ``phi3v-train bench`` the RSS also holds the tokenizer, the data pipeline,
gloo and DeepSpeed's buffers (~0.3 GiB on CPU), which the planner does not count. On GPU it is
unvalidated here (no device in the session that wrote it); ``bench/gpu_check.sh`` prints the
planner's number next to the measured peak for each length.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

GIB = 1024**3


@dataclass
class PlanConfig:
    """One configuration to plan (CLI flags of ``phi3v-train plan`` map onto these)."""

    model: str = "phi-3-vision-128k-instruct"
    """Model config name or path (see model/config.py load_model_config)."""
    num_nodes: int = 1
    """Nodes in the job."""
    gpus_per_node: int = 8
    """Ranks (devices) per node; data-parallel size N = num_nodes * gpus_per_node."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Optimizer states (fp32 master, fp32 grads, Adam) in host memory."""
    offload_param: bool = False
    """ZeRO-3 parameter partition in host memory."""
    precision: str = "bf16"
    """bf16 (fp32 master weights) | fp32."""
    seq_len: int = 8192
    """L: tokens per packed row."""
    micro_batch_size: int = 1
    """B: rows per micro-step."""
    gradient_checkpointing: bool = True
    """Recompute decoder and CLIP layers in backward."""
    loss_chunk_size: int | None = 4096
    """Tokens per chunk of the chunked cross-entropy; None = whole-batch logits."""
    attn_implementation: str = "flash_attention_2"
    """flash_attention_2 | flex_attention | sdpa | eager (mask and score memory, see module doc)."""
    image_token_share: float = 0.5
    """Fraction of the row's tokens that are image tokens (sets the number of CLIP crops run)."""
    reduce_bucket_size: int = 50_000_000
    """DeepSpeed reduce_bucket_size (elements), from configs/deepspeed/*.json."""
    prefetch_bucket_size: int = 50_000_000
    """DeepSpeed stage3_prefetch_bucket_size (elements)."""
    cpu: bool = False
    """Plan process RSS on CPU ranks (only touched pages of the reduce bucket count)."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage=3")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r}: use bf16 or fp32")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @classmethod
    def from_deepspeed_json(cls, path, **kwargs) -> PlanConfig:
        """Take the stage, offload and bucket sizes from a DeepSpeed JSON (configs/deepspeed)."""
        zero = json.loads(open(path).read()).get("zero_optimization", {})
        return cls(zero_stage=zero.get("stage", 0),
                   offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") == "cpu",
                   offload_param=zero.get("offload_param", {}).get("device", "none") == "cpu",
                   reduce_bucket_size=int(zero.get("reduce_bucket_size", 5e8)),
                   prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 5e7)), **kwargs)


@dataclass
class ModelShape:
    """The sizes the planner needs, from a Phi3VConfig."""

    num_params: int
    largest_module_params: int
    H: int
    I: int
    V: int
    L: int
    n_heads: int
    Dv: int
    Fv: int
    nv_heads: int
    vision_layers_run: int
    vision_tokens_per_crop: int
    image_tokens_per_crop: int
    crop_pixels: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        if isinstance(config, str):
            from .model.config import load_model_config

            config = load_model_config(config)
        t, v = config.text_config, config.vision_config
        H, I, V, L = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
        n_h, n_kv = t.num_attention_heads, t.num_key_value_heads or t.num_attention_heads
        d_h = H // n_h
        layer = H * (n_h + 2 * n_kv) * d_h + n_h * d_h * H + 3 * H * I + 2 * H
        Dv, Fv, p, S = v.hidden_size, v.intermediate_size, v.patch_size, v.image_size
        g = S // p
        n = 1 + g * g
        clip_layer = 4 * (Dv * Dv + Dv) + 2 * Dv * Fv + Fv + Dv + 4 * Dv
        vision = (Dv + 3 * p * p * Dv + n * Dv + 2 * Dv + v.num_hidden_layers * clip_layer + 2 * Dv
                  + 8 * Dv + 4 * Dv * H + H + H * H + H)
        num_params = V * H + L * layer + H + H * V + vision
        return cls(num_params=num_params, largest_module_params=max(layer, V * H, clip_layer), H=H, I=I, V=V, L=L,
                   n_heads=n_h, Dv=Dv, Fv=Fv, nv_heads=v.num_attention_heads, vision_layers_run=v.num_hidden_layers - 1,
                   vision_tokens_per_crop=n, image_tokens_per_crop=(g // 2) ** 2 + g // 2, crop_pixels=3 * S * S)


def decoder_layer_act_bytes(H: int, I: int, n_heads: int, e: int) -> int:
    """Bytes autograd saves per token in one Phi-3 decoder layer (SDPA/flash attention)."""
    return 11 * H * e + 2 * H * 4 + 4 * I * e + 4 * n_heads + 8


def clip_layer_act_bytes(Dv: int, Fv: int, n_heads: int, e: int) -> int:
    """Bytes autograd saves per vision token in one CLIP encoder layer (SDPA attention)."""
    return e * (8 * Dv + 3 * Fv + 4) + 4 * n_heads


@dataclass
class MemoryPlan:
    """Per-device memory in bytes (``gib()`` for GiB), and host memory per rank."""

    config: PlanConfig
    num_params: int
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    zero_buffers: float = 0.0
    attn_mask: float = 0.0
    lm_activations: float = 0.0
    vision_activations: float = 0.0
    loss_peak: float = 0.0
    recompute_peak: float = 0.0
    host_offload_per_rank: float = 0.0
    crops_per_micro_batch: float = 0.0
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Peak bytes per device."""
        return (self.params + self.grads + self.optimizer + self.zero_buffers + self.attn_mask
                + self.lm_activations + self.vision_activations + max(self.loss_peak, self.recompute_peak))

    def gib(self) -> dict:
        d = {k: getattr(self, k) / GIB for k in ("params", "grads", "optimizer", "zero_buffers", "attn_mask",
                                                  "lm_activations", "vision_activations", "loss_peak",
                                                  "recompute_peak", "host_offload_per_rank")}
        d["total"] = self.total / GIB
        return d


def plan_memory(cfg: PlanConfig, shape: ModelShape | None = None) -> MemoryPlan:
    """Per-device peak memory of ``cfg`` (formulas in the module docstring)."""
    s = shape or ModelShape.from_config(cfg.model)
    P, N = s.num_params, cfg.world_size
    e = 2 if cfg.precision == "bf16" else 4
    # optimizer part per parameter: fp32 master (DeepSpeed keeps one even for fp32), fp32 grads (bf16 only:
    # for fp32 the grad is the working grad, counted under grads), Adam m and v
    opt_per_param = (0 if (cfg.zero_stage == 0 and e == 4) else 4) + (4 if e == 2 else 0) + 8
    plan = MemoryPlan(config=cfg, num_params=P)
    st = cfg.zero_stage
    plan.params = P * e / (N if st == 3 else 1)
    plan.grads = 0.0 if st == 3 else P * e  # stage 3: the fp32 grad partition is in the optimizer part
    if st == 3 and e == 4:
        plan.grads = P * 4 / N
    opt = P * opt_per_param / (N if st >= 1 else 1)
    if cfg.offload_optimizer:
        plan.host_offload_per_rank += opt
    else:
        plan.optimizer = opt
    if cfg.offload_param:
        plan.host_offload_per_rank += plan.params
        plan.params = 0.0
    if st == 3:
        bucket = min(cfg.reduce_bucket_size, P) if cfg.cpu else cfg.reduce_bucket_size
        plan.zero_buffers = e * (2 * s.largest_module_params + min(cfg.prefetch_bucket_size, P)) + e * bucket
    elif st == 2:
        plan.zero_buffers = e * (min(cfg.reduce_bucket_size, P) if cfg.cpu else cfg.reduce_bucket_size)

    B, L = cfg.micro_batch_size, cfg.seq_len
    tokens = B * L
    attn = cfg.attn_implementation
    if attn == "sdpa":
        plan.attn_mask = B * L * L
    elif attn == "eager":
        plan.attn_mask = B * L * L * e
    layer_full = decoder_layer_act_bytes(s.H, s.I, s.n_heads, e)
    if attn == "sdpa":  # SDPA turns the bool mask into an additive float mask per call and saves it
        layer_full += L * e
    elif attn == "eager":  # softmax probabilities (fp32, then cast) per head
        layer_full += s.n_heads * L * (4 + (e if e < 4 else 0)) - 4 * s.n_heads
    transient = (4 * s.I + 4 * s.H) * e
    misc = 4 * s.H * e + 2 * s.H * 4  # embeddings, merged image embeds, final norm (+ fp32 upcast)
    if cfg.gradient_checkpointing:
        plan.lm_activations = tokens * (s.L * s.H * e + misc)
        plan.recompute_peak = tokens * (layer_full + transient)
    else:
        plan.lm_activations = tokens * (s.L * layer_full + misc)
        plan.recompute_peak = tokens * transient

    crops = cfg.image_token_share * tokens / s.image_tokens_per_crop
    plan.crops_per_micro_batch = crops
    n = s.vision_tokens_per_crop
    clip_full = clip_layer_act_bytes(s.Dv, s.Fv, s.nv_heads, e)
    vision_misc = s.crop_pixels * e + 3 * n * s.Dv * e  # pixels, patch embeddings, pre-LN
    if cfg.gradient_checkpointing:
        per_crop = n * s.vision_layers_run * s.Dv * e + vision_misc
        plan.recompute_peak = max(plan.recompute_peak, crops * n * clip_full)
    else:
        per_crop = n * s.vision_layers_run * clip_full + vision_misc
    projector = cfg.image_token_share * tokens * (8 * s.Dv + 2 * s.H) * e  # HD layout copies + MLP inputs
    plan.vision_activations = crops * per_crop + projector

    chunk = tokens if cfg.loss_chunk_size is None else min(cfg.loss_chunk_size, tokens)
    plan.loss_peak = 12 * chunk * s.V + chunk * s.H * e
    return plan


def plan_table(plans: list[MemoryPlan]) -> str:
    """A markdown table of plans: one row per configuration, GiB per device."""
    head = ("| model | devices | ZeRO | offload | prec | seq len | micro batch | ckpt | loss chunk | attn "
            "| params+grads+optim | ZeRO buffers | mask | LM act | vision act | loss/recompute peak | total GiB/device "
            "| host GiB/rank |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        c, g = p.config, p.gib()
        off = "+".join(x for x, on in (("opt", c.offload_optimizer), ("param", c.offload_param)) if on) or "-"
        lines.append(
            f"| {c.model} | {c.num_nodes}x{c.gpus_per_node} | {c.zero_stage} | {off} | {c.precision} | {c.seq_len} "
            f"| {c.micro_batch_size} | {'yes' if c.gradient_checkpointing else 'no'} | {c.loss_chunk_size or 'none'} "
            f"| {c.attn_implementation} | {g['params'] + g['grads'] + g['optimizer']:.2f} | {g['zero_buffers']:.2f} "
            f"| {g['attn_mask']:.2f} | {g['lm_activations']:.2f} | {g['vision_activations']:.2f} "
            f"| {max(g['loss_peak'], g['recompute_peak']):.2f} | **{g['total']:.1f}** | {g['host_offload_per_rank']:.1f} |")
    return "\n".join(lines)


def default_plans(model: str = "phi-3-vision-128k-instruct", **overrides) -> list[MemoryPlan]:
    """The real 4.15B on 1 node x 8 GPUs at 8K / 32K / 128K (ZeRO-3, bf16, checkpointing,
    chunked loss, flash-attn), plus the variants that show what each switch buys."""
    base = PlanConfig(model=model, **overrides)
    shape = ModelShape.from_config(model)
    cfgs = [replace(base, seq_len=L) for L in (8192, 32768, 131072)]
    cfgs += [replace(base, seq_len=8192, gradient_checkpointing=False),
             replace(base, seq_len=131072, loss_chunk_size=None),
             replace(base, seq_len=131072, attn_implementation="sdpa"),
             replace(base, seq_len=131072, offload_optimizer=True, offload_param=True)]
    return [plan_memory(c, shape) for c in cfgs]


def plan_as_dict(plan: MemoryPlan) -> dict:
    return {"config": asdict(plan.config), "num_params": plan.num_params, "gib": plan.gib(),
            "crops_per_micro_batch": plan.crops_per_micro_batch}


# ------------------------------------------------------------------------------------ validation

MEASURE_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from phi3v_train.metrics import current_rss_bytes, peak_rss_bytes
from phi3v_train.model.config import load_model_config
from phi3v_train.model.modeling import Phi3VForCausalLM
L, chunk, gc, attn = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
c = load_model_config("tiny"); S = c.crop_size
torch.manual_seed(0)
doc, nimg = 200, c.num_image_tokens(2 * S, 2 * S)   # documents of 200 tokens, one 2x2-crop image each
ndocs = L // doc
ids = torch.randint(0, 32000, (1, L)); pos = torch.zeros(1, L, dtype=torch.long)
for d in range(ndocs):
    ids[0, d * doc + 2 : d * doc + 2 + nimg] = c.image_token_id
    pos[0, d * doc : (d + 1) * doc] = torch.arange(doc)
pos[0, ndocs * doc :] = torch.arange(L - ndocs * doc)
pv = torch.randn(5 * ndocs, 3, S, S); sizes = torch.tensor([[2 * S, 2 * S]] * ndocs)
# warm the framework up (lazy imports, kernels, autograd) on a throwaway model, so the delta counts tensors
w = Phi3VForCausalLM._from_config(c, attn_implementation=attn, dtype=torch.float32)
w(input_ids=ids[:, :64], position_ids=pos[:, :64], pixel_values=pv[:5], image_sizes=sizes[:1], labels=ids[:, :64]).loss.backward()
del w
base = current_rss_bytes()
m = Phi3VForCausalLM._from_config(c, attn_implementation=attn, dtype=torch.float32)
m.loss_chunk_size = chunk
if gc:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
for _ in range(2):
    m(input_ids=ids, position_ids=pos, pixel_values=pv, image_sizes=sizes, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"peak_delta": peak_rss_bytes() - base, "image_token_share": ndocs * nimg / L}))
"""

# (seq_len, loss_chunk_size, gradient_checkpointing, attention) measured by `phi3v-train plan --validate`
VALIDATION_POINTS = ((2048, 2048, False, "sdpa"), (4096, 1024, False, "sdpa"), (8192, 1024, True, "sdpa"),
                     (4096, 1024, False, "eager"))
VALIDATION_TOLERANCE = (0.85, 1.15)
"""measured / planned peak must lie in this range (measured on this CPU: 0.96-1.04 over VALIDATION_POINTS)."""


def validate_on_cpu(points=VALIDATION_POINTS, timeout_s: int = 300) -> list[dict]:
    """Measure the tiny model's peak RSS increase (build + 2 AdamW steps, fp32, one process, i.e.
    ZeRO stage 0 on 1 rank) in a fresh subprocess per point and compare it with :func:`plan_memory`."""
    import os
    import subprocess
    import sys

    rows = []
    for L, chunk, gc, attn in points:
        # a fixed mmap threshold: freed tensors go back to the OS, so RSS follows the live tensors
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                          "MASTER_", "OMP_", "MKL_", "DS_"))}
        env.update(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run([sys.executable, "-c", MEASURE_SCRIPT, str(L), str(chunk), str(int(gc)), attn],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"measurement at L={L} failed: {proc.stderr[-2000:]}")
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        pc = PlanConfig(model="tiny", gpus_per_node=1, zero_stage=0, precision="fp32", seq_len=L,
                        gradient_checkpointing=gc, loss_chunk_size=chunk, attn_implementation=attn,
                        image_token_share=m["image_token_share"], cpu=True)
        planned = plan_memory(pc).total
        rows.append({"seq_len": L, "loss_chunk_size": chunk, "gradient_checkpointing": gc, "attn": attn,
                     "measured_mib": m["peak_delta"] / 2**20, "planned_mib": planned / 2**20,
                     "ratio": m["peak_delta"] / planned})
    return rows


# ------------------------------------------------------------------------------------------ CLI

def cmd_plan(args) -> int:
    if args.validate:
        rows = validate_on_cpu()
        lo, hi = VALIDATION_TOLERANCE
        print("| seq len | loss chunk | ckpt | attn | measured MiB | planned MiB | measured/planned |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seq_len']} | {r['loss_chunk_size']} | {r['gradient_checkpointing']} | {r['attn']} "
                  f"| {r['measured_mib']:.0f} | {r['planned_mib']:.0f} | {r['ratio']:.2f} |")
        ok = all(lo <= r["ratio"] <= hi for r in rows)
        print(f"\nall within [{lo}, {hi}]: {ok}")
        return 0 if ok else 1
    base = dict(model=args.model, num_nodes=args.nodes, gpus_per_node=args.gpus_per_node, zero_stage=args.zero_stage,
                offload_optimizer=args.offload_optimizer, offload_param=args.offload_param, precision=args.precision,
                micro_batch_size=args.micro_batch_size, gradient_checkpointing=not args.no_checkpointing,
                loss_chunk_size=None if args.loss_chunk_size == 0 else args.loss_chunk_size,
                attn_implementation=args.attn, image_token_share=args.image_token_share)
    if args.seq_len:
        shape = ModelShape.from_config(args.model)
        plans = [plan_memory(PlanConfig(seq_len=L, **base), shape) for L in args.seq_len]
    else:
        base.pop("model")
        plans = default_plans(args.model, **base)
    print(f"Per-device peak memory (GiB, allocated; CUDA context and allocator slack come on top), "
          f"{plans[0].num_params / 1e9:.3f}B parameters:\n")
    print(plan_table(plans))
    if args.json:
        open(args.json, "w").write(json.dumps([plan_as_dict(p) for p in plans], indent=2))
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory for a model, cluster shape, ZeRO stage/offload, seq len, "
                                    "checkpointing and chunked loss (formulas in plan.py)")
    p.add_argument("--model", default="phi-3-vision-128k-instruct", help="model config name or path")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-param", action="store_true")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq-len", type=int, nargs="*", help="tokens per row (default: 8K, 32K, 128K and variants)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--no-checkpointing", action="store_true", help="no gradient checkpointing")
    p.add_argument("--loss-chunk-size", type=int, default=4096, help="0 = whole-batch logits")
    p.add_argument("--attn", default="flash_attention_2", choices=["flash_attention_2", "flex_attention", "sdpa", "eager"])
    p.add_argument("--image-token-share", type=float, default=0.5, help="fraction of tokens that are image tokens")
    p.add_argument("--json", help="also write the plans as JSON here")
    p.add_argument("--validate", action="store_true",
                   help="measure the tiny model's peak RSS on this CPU and compare with the planner")
    p.set_defaults(fn=cmd_plan)
