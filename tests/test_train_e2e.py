"""The real CLI on 2 CPU ranks with ZeRO-3 (gloo): training, checkpoints, exact resume after a kill
during a save and after a preemption signal, export, and the global token-mean gradient.

Runs are slow (~15 s each, mostly start-up), so each run checks several things. Helpers here are
also used by test_faults.py.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from phi3v_train.cli import cpu_torchrun_env, torchrun_cmd
from phi3v_train.config import REPO_ROOT
from phi3v_train.data.shards import write_shards

pytestmark = pytest.mark.slow
DEMO = str(REPO_ROOT / "configs/train/demo.yaml")
# Small packs keep steps short; every run of one test shares these so their losses compare.
FAST = ["packing.max_seq_len=256", "logging.log_every=1", "process_group_timeout_s=120"]
SECRETS = {"WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd", "HF_TOKEN": "hf_secretvalue0123456789"}
# The baseline: 6 steps, checkpoints every 2, a NaN loss injected at step 2 (skipped, counted).
BASE = [*FAST, "optim.max_steps=6", "checkpoint.save_every=2", "checkpoint.keep_last=2", "debug.nan_loss_steps=[2]"]


@pytest.fixture(scope="module")
def luma_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(REPO_ROOT / "data/luma/products.csv", REPO_ROOT / "data/luma", out, samples_per_shard=48, seed=0)
    return out


def run_train(run_dir: Path, overrides: list[str], timeout: int = 300, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """torchrun, 2 local ranks."""
    cmd = torchrun_cmd(2, DEMO, [f"run_dir={run_dir}", "process_group_timeout_s=120", *overrides])
    proc = subprocess.run(cmd, env={**cpu_torchrun_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_direct(run_dir: Path, overrides: list[str], env: dict | None = None, nproc: int = 2) -> list:
    """Start ``nproc`` ranks the way srun does (one process per rank, rank 0 hosts the store, no
    torchrun agent to clean up): returns the Popen objects; output in run_dir/../<name>.rank{r}.out."""
    port = free_port()
    procs = []
    for r in range(nproc):
        e = {**cpu_torchrun_env(), **(env or {}), "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r),
             "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out = open(run_dir.parent / f"{run_dir.name}.rank{r}.out", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "phi3v_train.cli", "train", "--config", DEMO,
                                       f"run_dir={run_dir}", *overrides], env=e, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list, timeout: float) -> list[int]:
    """Exit codes; kills everything left after ``timeout`` seconds (then fails)."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise


def direct_output(run_dir: Path, rank: int) -> str:
    return (run_dir.parent / f"{run_dir.name}.rank{rank}.out").read_text()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, luma_shards):
    """The uninterrupted run every resume is compared with; W&B on (offline) and secrets in the env."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    proc = run_train(run_dir, [f"data.shards={luma_shards}", *BASE, "logging.wandb=true", "logging.wandb_mode=offline"],
                     env=SECRETS)
    return run_dir, proc


def test_two_rank_zero3_training(baseline):
    run_dir, proc = baseline
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["preempted"] is False
    # Parameters really partitioned: nothing materialised at init, each rank holds about half.
    assert summary["local_param_numel_at_init"] == 0
    assert 0.45 * summary["num_params"] <= summary["partition_numel_rank0"] <= 0.55 * summary["num_params"]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # The injected NaN at step 2 was skipped on both ranks and counted; the run went on.
    assert metrics[1]["loss"] is None and summary["skipped_steps"] == 1
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1, 1, 1]
    assert metrics[1]["lr"] == metrics[0]["lr"]  # a skipped step does not advance the LR schedule
    fine = [m for i, m in enumerate(metrics) if i != 1]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in fine)
    assert all(0 < m["packing_efficiency"] <= 1 and m["images"] > 0 for m in metrics)
    assert metrics[-1]["eta_s"] == 0 and "eta 0:00:0" in proc.stdout
    # Checkpoints: every 2 steps, the last 2 kept, each complete (both ranks' partitions, RNG,
    # config, meta); `latest` names the last.
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_0000004", "step_0000006"]
    files = sorted(p.name for p in (ckpt / "step_0000006").iterdir())
    assert any("rank_0" in f for f in files) and any("rank_1" in f for f in files), files
    assert {"rng_rank0.pt", "rng_rank1.pt", "config.yaml", "meta.json"} <= set(files)
    meta = json.loads((ckpt / "step_0000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 2 and meta["micro_batches_per_rank"] == 12
    assert meta["num_skipped_steps"] == 1
    # Logs per rank; W&B offline files with the resolved config; no secret anywhere in the run dir.
    assert (run_dir / "config.yaml").exists() and (run_dir / "logs/rank1.log").exists()
    assert "update skipped" in (run_dir / "logs/rank1.log").read_text()
    assert "'HF_TOKEN': '***'" in (run_dir / "logs/rank0.log").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in data, f"{name} leaked into {path}"


def test_export_to_hf_directory(baseline, tmp_path):
    """`phi3v-train export`: the ZeRO-3 checkpoint -> official-format safetensors that load back equal."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from phi3v_train.model.modeling import Phi3VForCausalLM

    run_dir, _ = baseline
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "phi3v_train.cli", "export", "--run-dir", str(run_dir), "--tag",
                           "step_0000004", "--out", str(out)], env=cpu_torchrun_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "export step_0000004" in proc.stderr and "100%" in proc.stderr  # the tqdm bar
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(f.endswith(".safetensors") for f in index["weight_map"].values())
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    model = Phi3VForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_0000004")
    state = model.state_dict()
    for name, tensor in ref.items():
        assert torch.equal(state[name.removeprefix("module.")], tensor), name


def test_exact_resume_after_kill_in_save_and_preemption(baseline, luma_shards, tmp_path):
    """Run 1 is SIGKILLed (rank 0) in the middle of saving step 4: the survivor names the dead
    rank, `latest` stays on step 2. Run 2 resumes from step 2 (with 2 loader workers instead of
    none) and gets SIGUSR1 on rank 1 during
    step 5: both ranks checkpoint step 5, rank 0 runs `scontrol requeue`, both exit 3. Run 3
    resumes from step 5 and finishes. Every step's loss equals the uninterrupted run's."""
    base_dir, _ = baseline
    run_dir = tmp_path / "run"
    common = [f"data.shards={luma_shards}", *BASE]

    procs = start_direct(run_dir, [*common, "debug.kill_in_save_step=4"])
    rcs = wait_all(procs, 240)
    assert rcs[0] == -9, direct_output(run_dir, 0)[-3000:]
    assert rcs[1] == 4, direct_output(run_dir, 1)[-3000:]  # PEER_LOST_EXIT_CODE
    assert "lost peer rank 0" in direct_output(run_dir, 1)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert (ckpt / "tmp-step_0000004").is_dir() and not (ckpt / "step_0000004").exists()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]  # 3, 4: past the last checkpoint

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # run 2 loads with 2 DataLoader workers (runs 1 and 3: in the training process): the same batches
    procs = start_direct(run_dir, [*common, "debug.signal_step=5", "debug.signal_rank=1", "data.num_workers=2"], env=env)
    rcs = wait_all(procs, 240)
    assert rcs == [3, 3], direct_output(run_dir, 0)[-3000:] + direct_output(run_dir, 1)[-3000:]  # PREEMPTED
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (ckpt / "tmp-step_0000004").exists()  # the unfinished save was removed on resume
    assert (ckpt / "latest").read_text().strip() == "step_0000005"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] is True and summary["resumed_from_step"] == 2 and summary["last_step"] == 5
    assert "resumed from" in (run_dir / "logs/rank1.log").read_text()
    assert "another data order" not in (run_dir / "logs/rank0.log").read_text()

    run_train(run_dir, common)
    metrics, base = read_metrics(run_dir), read_metrics(base_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # every step exactly once
    assert [m["skipped_steps"] for m in metrics] == [m["skipped_steps"] for m in base]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 5
    for m, b in zip(metrics, base):
        assert m["lr"] == b["lr"], (m["step"], m["lr"], b["lr"])
        if b["loss"] is None:
            assert m["loss"] is None
        else:
            assert m["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (m["step"], m["loss"], b["loss"])


def test_text_only_rank_does_not_hang(tmp_path, luma_shards):
    """Rank 1 gets only text-only samples: it must still run the vision tower (dummy crop) each micro-step."""
    manifest = json.loads((luma_shards / "manifest.json").read_text())
    image_shard = luma_shards / manifest["splits"]["train"]["shards"][0]
    data = tmp_path / "mixed"
    data.mkdir()
    (data / "a-images.tar").symlink_to(image_shard)
    with wds.TarWriter(str(data / "b-text.tar")) as tw:
        for i, rec in enumerate(wds.WebDataset(str(image_shard), shardshuffle=False).decode()):
            rec = dict(rec["json"], prompt="Name a product from the Luma catalog.")
            tw.write({"__key__": f"text{i:04d}", "json": rec})
    (data / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": ["a-images.tar", "b-text.tar"]}}}))
    run_dir = tmp_path / "run"
    run_train(run_dir, [f"data.shards={data}", "data.split_shards_by_rank=true", "optim.max_steps=3",
                        "logging.log_every=1"], timeout=240)
    metrics = read_metrics(run_dir)
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    assert "images" in metrics[0]


GRAD_WORKER = r'''
import sys
import deepspeed, torch, torch.distributed as td
from phi3v_train import dist
from phi3v_train.config import build_deepspeed_config, load_config, lr_at
from phi3v_train.train import build_model, train_step

config, batches_file, out_file, *overrides = sys.argv[1:]
cfg = load_config(config, overrides)
denv = dist.get_dist_env()
dist.init_distributed(denv, 120)
ds_config = build_deepspeed_config(cfg, denv.world_size)
torch.manual_seed(0)
model, keep = build_model(cfg, ds_config)
engine, _, _, _ = deepspeed.initialize(
    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg.optim)))
batches = torch.load(batches_file, weights_only=False)
n_label = sum(b["num_label_tokens"] for b in batches)  # the global batch: all ranks, all micro-steps
k = len(batches) // denv.world_size
mine = batches[denv.rank * k:(denv.rank + 1) * k]

def gather():
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

p0 = gather()
loss, applied = train_step(engine, mine, n_label, denv.world_size, torch.device("cpu"))
td.all_reduce(loss)
p1 = gather()
if denv.rank == 0:
    torch.save({"p0": p0, "p1": p1, "loss": loss.item(), "applied": applied}, out_file)
td.barrier()
'''


def test_grad_accumulation_and_data_parallel_give_global_token_mean(tmp_path, luma_shards):
    """2 ranks x 2 micro-steps (ZeRO-3) take the same optimizer step as one plain PyTorch process
    on all 4 micro-batches with loss = sum(CE) / (all label tokens). Micro-batches hold 1-3
    samples, so a mean of per-micro-batch or per-rank means would differ. AdamW with eps >> |g|
    makes the update lr/eps * g: the parameters after one step compare the gradients."""
    import tarfile

    from PIL import Image

    from phi3v_train.config import load_config
    from phi3v_train.data.collate import collate_packs
    from phi3v_train.model.config import load_model_config
    from phi3v_train.model.modeling import Phi3VForCausalLM
    from phi3v_train.model.processor import Phi3VProcessor

    mcfg = load_model_config("tiny")
    processor = Phi3VProcessor.from_pretrained(num_crops=mcfg.num_crops, crop_size=mcfg.crop_size,
                                               patch_size=mcfg.patch_size)
    manifest = json.loads((luma_shards / "manifest.json").read_text())
    samples = []
    with tarfile.open(luma_shards / manifest["splits"]["train"]["shards"][0]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".json") and len(samples) < 7:
                record = json.loads(tar.extractfile(members[name]).read())
                image_name = next(n for n in members if n.startswith(name[:-5] + ".") and n != name)
                image = Image.open(tar.extractfile(members[image_name])).convert("RGB")
                samples.append(processor.encode_reference_sample(record, image))
    groups = [samples[0:1], samples[1:4], samples[4:6], samples[6:7]]  # 1, 3, 2, 1 samples per micro-batch
    batches = [collate_packs([g], 256, crop_size=mcfg.crop_size) for g in groups]
    assert len({b["num_label_tokens"] for b in batches}) > 1
    torch.save(batches, tmp_path / "batches.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(GRAD_WORKER)
    lr, eps = 1e4, 1e3
    overrides = ["optim.gradient_accumulation_steps=2", "optim.grad_clip=0", "optim.weight_decay=0",
                 "optim.warmup_steps=0", f"optim.lr={lr}", f"optim.eps={eps}", "packing.max_seq_len=256"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), DEMO,
           str(tmp_path / "batches.pt"), str(tmp_path / "out.pt"), *overrides]
    proc = subprocess.run(cmd, env=cpu_torchrun_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["applied"]

    # One plain process, no DeepSpeed: the same parameters, all 4 micro-batches, AdamW.
    cfg = load_config(DEMO, overrides)
    model = Phi3VForCausalLM._from_config(mcfg, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation)
    model.loss_chunk_size = cfg.model.loss_chunk_size
    missing, unexpected = model.load_state_dict(got["p0"], strict=False)
    assert not unexpected and set(missing) <= {n for n, _ in model.named_buffers()}
    n_label = sum(b["num_label_tokens"] for b in batches)
    total = 0.0
    for b in batches:
        loss = model(**b, num_items_in_batch=n_label).loss
        loss.backward()
        total += loss.item()
    assert got["loss"] == pytest.approx(total, rel=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(params, lr=lr, betas=cfg.optim.betas, eps=eps, weight_decay=0.0).step()
    sq_err = sq_ref = 0.0
    per_tensor = {}
    for name, p in model.named_parameters():
        ref_delta = (p.detach() - got["p0"][name]).double()
        ds_delta = (got["p1"][name] - got["p0"][name]).double()
        if not p.requires_grad:
            assert ds_delta.abs().max() == 0, name
            continue
        sq_err += float((ds_delta - ref_delta).norm() ** 2)
        sq_ref += float(ref_delta.norm() ** 2)
        per_tensor[name] = (float((ds_delta - ref_delta).norm()), float(ref_delta.norm()))
    assert len(per_tensor) > 20
    # All parameters together, and each tensor that moves at all (some gradients are zero in
    # exact arithmetic, e.g. attention key biases: there only rounding noise differs).
    assert (sq_err / sq_ref) ** 0.5 < 1e-5, (sq_err / sq_ref) ** 0.5
    largest = max(ref for _, ref in per_tensor.values())
    for name, (err, ref) in per_tensor.items():
        assert err <= 1e-5 * ref + 1e-7 * largest, (name, err, ref)


def test_rows_of_the_longest_pack_train_like_full_rows(tmp_path, luma_shards):
    """packing.padding=longest under 2-rank ZeRO-3: the ranks' rows differ in length, so do their
    loss chunk counts (loss_chunk_size=4: ~60 lm_head calls, one weight all-gather each); they must
    still agree (no hang, no abort), and every step's loss equals rows of max_seq_len."""
    common = [f"data.shards={luma_shards}", *FAST, "optim.max_steps=3", "model.loss_chunk_size=4"]
    full, short = tmp_path / "full", tmp_path / "short"
    run_train(full, [*common, "packing.padding=max_length"])
    run_train(short, [*common, "packing.padding=longest", "packing.pad_to_multiple_of=1"])
    a, b = read_metrics(full), read_metrics(short)
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)
    assert [m["tokens"] for m in b] == [m["tokens"] for m in a]
    assert all(mb["token_slots"] < ma["token_slots"] for ma, mb in zip(a, b))  # fewer padding slots computed
    assert all(mb["packing_efficiency"] > ma["packing_efficiency"] == ma["pack_fill"] for ma, mb in zip(a, b))


def test_resume_with_other_gradient_accumulation_continues_the_data(tmp_path, luma_shards):
    """The loader resumes at the micro batches consumed (from the checkpoint), not at step x the new
    gradient accumulation: 2 steps x 2 micro batches, then 1 step x 1 starts at micro batch 4."""
    run_dir = tmp_path / "run"
    common = [f"data.shards={luma_shards}", *FAST, "checkpoint.save_every=2"]
    run_train(run_dir, [*common, "optim.max_steps=2", "optim.gradient_accumulation_steps=2"])
    run_train(run_dir, [*common, "optim.max_steps=3", "optim.gradient_accumulation_steps=1"])
    assert "at step 2 (micro batch 4)" in (run_dir / "logs/rank0.log").read_text()
    meta = json.loads((run_dir / "checkpoints/step_0000003/meta.json").read_text())
    assert meta["micro_batches_per_rank"] == 5 and meta["data_order"]["data.num_streams"] == 8
    assert "another data order" not in (run_dir / "logs/rank1.log").read_text()
