"""One-device throughput check: the real 4.15B Phi-3-V, random weights, ZeRO-3 bf16, packed rows.

For each sequence length (default 8K, 32K, 128K) it runs ``--warmup`` + ``--steps`` optimizer
steps on synthetic packed rows (documents of ``--doc-len`` tokens, each with one image of 1x1..2x2
HD crops, collated by the real ``collate_packs``), through the real training pieces
(``train.build_model``, DeepSpeed ZeRO-3, ``train.train_step``, ``metrics.ThroughputMeter``), and
prints tokens/s, TFLOP/s, MFU (whole step and forward+backward only) and peak memory per length,
next to the memory planner's prediction. One JSON line per length goes to ``--json``.

ZeRO-3 on one device cannot shard anything: the optimizer states (16 bytes/param = 66 GB) go to
host memory (``--offload``, default on for the real model) so 128K activations fit on an 80-141 GB
GPU; the optimizer step then runs on the CPU (torch AdamW) and is reported apart (``optimizer_s``,
and ``mfu_fwd_bwd`` excludes it).

Attention: flash_attention_2 when flash-attn imports, else flex_attention, else sdpa (sdpa at 128K
needs ~1 TB for the packed mask: that length is skipped with the planner's number).

    bash bench/gpu_check.sh                 # GPU: real model, 8K/32K/128K, < 8 min on one H100/H200
    bash bench/gpu_check.sh --tiny          # CPU: tiny model, 256/512/1024 (CI keeps it working)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=r".*deprecated.*")


def best_attention() -> str:
    """flash_attention_2 if flash-attn is importable, else flex_attention (torch >= 2.5), else sdpa."""
    if not torch.cuda.is_available():
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        return "flex_attention"
    except ImportError:
        return "sdpa"


def synthetic_row(config, seq_len: int, doc_len: tuple[int, int], rng: random.Random) -> list[dict]:
    """Samples (docs/architecture.md) filling one row of ``seq_len`` tokens exactly: documents of
    ``doc_len`` tokens (uniform), each with one image of hc x wc crops (1..2 each) when it fits."""
    S = config.crop_size
    samples, used = [], 0
    while used < seq_len:
        n = min(rng.randint(*doc_len), seq_len - used)
        hc, wc = rng.randint(1, 2), rng.randint(1, 2)
        n_img = config.num_image_tokens(hc * S, wc * S)
        ids = torch.randint(100, 32000, (n,))
        labels = ids.clone()
        pixel_values, image_sizes = torch.zeros(0, 3, S, S), torch.zeros(0, 2, dtype=torch.long)
        if n >= n_img + 8:
            ids[2:2 + n_img] = config.image_token_id
            labels[: 2 + n_img] = -100
            pixel_values = torch.randn(1 + hc * wc, 3, S, S)
            image_sizes = torch.tensor([[hc * S, wc * S]])
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixel_values,
                        "image_sizes": image_sizes, "key": f"doc{len(samples)}"})
        used += n
    return samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (or GPU), short rows: the CI mode")
    ap.add_argument("--seq-lens", type=int, nargs="*", help="tokens per row (default 8192 32768 131072; tiny: 256 512 1024)")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps per length")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps per length")
    ap.add_argument("--doc-len", type=int, nargs=2, help="document length range (default 1024 4096; tiny 32 128)")
    ap.add_argument("--attn", default="auto", help="auto | flash_attention_2 | flex_attention | sdpa | eager")
    ap.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                    help="optimizer states in host memory (auto: on for the real model on GPU)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 on GPU, fp32 on CPU (as the CPU demo)")
    ap.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: the flops.py table)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining lengths after this many seconds")
    ap.add_argument("--json", help="append one JSON line per length here")
    args = ap.parse_args(argv)

    from phi3v_train import dist, metrics
    from phi3v_train.config import build_deepspeed_config, load_config
    from phi3v_train.data.collate import collate_packs
    from phi3v_train.flops import FlopModel
    from phi3v_train.plan import PlanConfig, plan_memory
    from phi3v_train.train import build_model, train_step

    t_start = time.time()
    cuda = torch.cuda.is_available()
    model_name = "tiny" if args.tiny else "phi-3-vision-128k-instruct"
    seq_lens = args.seq_lens or ([256, 512, 1024] if args.tiny else [8192, 32768, 131072])
    doc_len = tuple(args.doc_len or ((32, 128) if args.tiny else (1024, 4096)))
    attn = best_attention() if args.attn == "auto" else args.attn
    offload = args.offload == "on" or (args.offload == "auto" and cuda and not args.tiny)
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    chunk = 4096 if not args.tiny else 256
    cfg = load_config(None, [
        f"model.name={model_name}", f"model.attn_implementation={attn}", "model.gradient_checkpointing=true",
        f"model.loss_chunk_size={chunk}", f"deepspeed.precision={precision}", "deepspeed.torch_adam=true",
        f"deepspeed.offload_optimizer={str(offload).lower()}", "optim.lr=1e-5", "optim.warmup_steps=0",
        f"optim.max_steps={args.warmup + args.steps}", "optim.micro_batch_size=1", "optim.gradient_accumulation_steps=1",
        f"packing.max_seq_len={max(seq_lens)}", "run_dir=runs/gpu_check"])
    denv = dist.get_dist_env()
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    denv = dist.DistEnv(rank=denv.rank, world_size=denv.world_size, local_rank=denv.local_rank,
                        local_world_size=denv.local_world_size, master_addr=denv.master_addr,
                        master_port=int(os.environ["MASTER_PORT"]))
    ds_config = build_deepspeed_config(cfg, denv.world_size)
    if offload:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    backend = dist.init_distributed(denv, 600)
    import deepspeed

    device = dist.device()
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"[gpu_check] {model_name} | {gpu} | backend {backend} | attention {attn} | {precision} ZeRO-3, "
          f"optimizer offload {offload} | torch {torch.__version__} deepspeed {deepspeed.__version__}", flush=True)
    torch.manual_seed(0)
    rss0 = metrics.current_rss_bytes()
    model, _dschf = build_model(cfg, ds_config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    mcfg = model.config
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    print(f"[gpu_check] built {num_params / 1e9:.3f}B parameters in {time.time() - t_start:.0f} s", flush=True)
    peak = metrics.resolve_peak_flops(args.peak_tflops)
    flop_model = FlopModel.from_config(mcfg)
    rng = random.Random(0)
    rows = []

    def emit(row: dict) -> None:  # one JSON line per length as soon as it is known (the run may be cut at 8 min)
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    def planned_gib(L: int, image_token_share: float) -> float:
        return plan_memory(PlanConfig(model=model_name, gpus_per_node=denv.world_size, zero_stage=3,
                                      offload_optimizer=offload, precision=precision, seq_len=L,
                                      gradient_checkpointing=True, loss_chunk_size=chunk, attn_implementation=attn,
                                      image_token_share=image_token_share, cpu=not cuda)).total / 2**30

    for L in seq_lens:
        plan = planned_gib(L, 0.25)
        row = {"model": model_name, "device": gpu, "attn": attn, "seq_len": L, "planned_gib": plan}
        if attn in ("sdpa", "eager") and cuda and L > 32768:
            row["skipped"] = f"{attn} with a packed mask at {L} needs ~{plan:.0f} GiB (planner)"
        elif time.time() - t_start > args.budget_s:
            row["skipped"] = f"time budget {args.budget_s:.0f} s spent"
        if "skipped" in row:
            print(f"[gpu_check] L={L}: skipped: {row['skipped']}", flush=True)
            emit(row)
            continue
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        meter = metrics.ThroughputMeter(flop_model, device=device, peak_flops=peak,
                                        image_token_id=mcfg.image_token_id, rss_baseline=rss0)
        # batches built before the clock starts (random crops for 128K take seconds on the CPU)
        batches = [collate_packs([synthetic_row(mcfg, L, doc_len, rng)], L, crop_size=mcfg.crop_size)
                   for _ in range(args.warmup + args.steps)]
        try:
            for step, batch in enumerate(batches):
                if step == args.warmup:  # measure from here
                    meter.flush(1.0, 1)
                    t0 = time.perf_counter()
                meter.add_batch(batch)
                n_label = float(batch["num_label_tokens"]) * denv.world_size
                train_step(engine, [batch], max(n_label, 1.0), denv.world_size, device, meter)
            if cuda:
                torch.cuda.synchronize()
            rec = meter.flush(time.perf_counter() - t0, args.steps)
        except torch.OutOfMemoryError as e:
            row["error"] = f"OOM: {str(e).splitlines()[0]}"
            print(f"[gpu_check] L={L}: {row['error']}", flush=True)
            emit(row)
            continue
        del batches
        fwd_bwd = rec["forward_s"] + rec["backward_s"]
        row["planned_gib"] = plan = planned_gib(L, rec["image_token_share"] * (1 - rec["padding_share"]))
        row.update({k: rec.get(k) for k in ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
                                            "step_time_s", "forward_s", "backward_s", "optimizer_s",
                                            "gpu_mem_allocated_gib", "gpu_mem_reserved_gib", "rss_peak_gib", "rss_peak_delta_gib",
                                            "image_token_share")})
        row["tflops_fwd_bwd_per_device"] = rec["model_flops"] / args.steps / max(fwd_bwd, 1e-9) / denv.world_size / 1e12
        row["mfu_fwd_bwd"] = row["tflops_fwd_bwd_per_device"] * 1e12 / peak if peak else None
        mem = (f"peak alloc {row['gpu_mem_allocated_gib']:.1f} GiB, reserved {row['gpu_mem_reserved_gib']:.1f} GiB"
               if cuda else f"peak RSS {row['rss_peak_gib']:.2f} GiB (+{row['rss_peak_delta_gib']:.2f} over the start)")
        mfu = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
        print(f"[gpu_check] L={L}: {row['tokens_per_s']:.0f} tokens/s, {row['tflops_per_device']:.4g} TFLOP/s "
              f"(fwd+bwd {row['tflops_fwd_bwd_per_device']:.4g}), MFU {mfu(row['mfu'])} (fwd+bwd {mfu(row['mfu_fwd_bwd'])}), "
              f"step {row['step_time_s']:.2f} s (fwd {row['forward_s']:.2f} bwd {row['backward_s']:.2f} "
              f"opt {row['optimizer_s']:.2f}), {mem}, planner {plan:.1f} GiB", flush=True)
        emit(row)
    print(f"[gpu_check] done in {time.time() - t_start:.0f} s", flush=True)
    ok = all("tokens_per_s" in r or "skipped" in r for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
