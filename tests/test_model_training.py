"""Training-side model behaviour: packing on every attention backend, the flash varlen plumbing, gradient
checkpointing, freezing, the loss paths, greedy decoding (cached and cache-less), and the loss-memory benchmark.

Packed batches come from the real collate (`collate_packs`, B = 2 rows); the config switches longrope to the
long factors past 32 positions, so packs mix long-factor and short-factor documents.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers.masking_utils
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import phi3v_train.model.modeling as modeling
from phi3v_train.data.collate import collate_packs
from phi3v_train.model.loss import liger_available
from phi3v_train.model.modeling import Phi3VForCausalLM, apply_freezing
from test_model import alone, make_sample
from test_model_fidelity import ORIGINAL, small_context_config

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def build(attn: str = "eager", seed: int = 0) -> Phi3VForCausalLM:
    torch.manual_seed(seed)
    return Phi3VForCausalLM._from_config(small_context_config(), attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def packs() -> list[list[dict]]:
    """Two packs: [long doc (long factors), text-only doc], [short doc with two images]."""
    config = small_context_config()
    long_doc = make_sample(config, [(1, 2), (2, 1)], seed=31)
    text_doc = make_sample(config, [], seed=32)
    short_doc = make_sample(config, [(1, 1)], seed=33)
    assert len(long_doc["input_ids"]) > ORIGINAL >= max(len(text_doc["input_ids"]), len(short_doc["input_ids"]))
    return [[long_doc | {"key": "a"}, text_doc | {"key": "b"}], [short_doc | {"key": "c"}]]


def check_packed_equals_alone(model: Phi3VForCausalLM, packs: list[list[dict]], atol: float = 1e-5,
                              **collate_kwargs) -> None:
    """Per-sample logits and summed losses from the packed batch equal each sample run alone (eager)."""
    reference = build("eager")
    reference.load_state_dict(model.state_dict())
    batch = collate_packs(packs, max_seq_len=64 + ORIGINAL, crop_size=model.config.crop_size, **collate_kwargs)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, L, V]
        for row, pack in enumerate(packs):
            start = 0
            for sample in pack:
                end = start + len(sample["input_ids"])
                single = alone(sample)
                single_logits = reference(**{k: v for k, v in single.items() if k != "labels"}).logits[0]
                torch.testing.assert_close(logits[row, start:end], single_logits, rtol=0, atol=atol)
                labels = torch.full_like(batch["labels"], -100)
                labels[row, start + 1 : end] = sample["labels"][1:]
                packed_loss = model(**(batch | {"labels": labels}), num_items_in_batch=1).loss
                single_loss = reference(**single, num_items_in_batch=1).loss
                torch.testing.assert_close(packed_loss, single_loss, rtol=0, atol=atol)
                start = end


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_equals_samples_alone(attn, packs):
    check_packed_equals_alone(build(attn), packs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rows_of_the_longest_pack_give_the_same_results(attn, packs):
    """packing.padding=longest: shorter rows (the longest pack rounded up to 8), same per-sample results."""
    longest = max(sum(len(s["input_ids"]) for s in p) for p in packs)
    row = collate_packs(packs, 64 + ORIGINAL, crop_size=56, padding="longest", pad_to_multiple_of=8)["input_ids"]
    assert row.shape[1] == -(-longest // 8) * 8 < 64 + ORIGINAL
    check_packed_equals_alone(build(attn), packs, padding="longest", pad_to_multiple_of=8)


def test_flex_attention_packed_batch_equals_samples_alone(packs):
    """flex_attention (a BlockMask from position_ids; torch.compile on CPU: ~20 s, the slowest test here)."""
    check_packed_equals_alone(build("flex_attention"), packs, atol=2e-5)


def fake_flash_varlen(calls: list):
    """A CPU stand-in for transformers' flash_attention_2 entry: causal attention inside each cu_seqlens segment
    of the flattened B*T tokens; fails unless the varlen kwargs arrive ready-made."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kw):
        cu, max_len = kw["cu_seq_lens_q"], kw["max_length_q"]
        assert attention_mask is None and kw["cu_seq_lens_k"] is cu and kw["max_length_k"] == max_len
        assert cu.dtype == torch.int32 and type(max_len) is int
        calls.append(cu)
        batch, heads, length, dim = query.shape
        q, k, v = (x.transpose(1, 2).reshape(batch * length, heads, dim) for x in (query, key, value))
        out = torch.empty_like(q)
        bounds = cu.tolist()
        assert bounds[-1] == batch * length and max(e - s for s, e in zip(bounds, bounds[1:])) == max_len
        for s, e in zip(bounds, bounds[1:]):
            q_seg, k_seg, v_seg = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, n, d]
            seg = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, is_causal=True, scale=scaling)
            out[s:e] = seg.transpose(0, 1)
        return out.reshape(batch, length, heads, dim), None

    return attention


def test_flash_path_takes_cu_seqlens_from_the_batch(packs, monkeypatch):
    calls = []
    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {"flash_attention_2": fake_flash_varlen(calls)})

    model = build("eager")
    model.config.text_config._attn_implementation_internal = "flash_attention_2"  # the LM only; CLIP stays eager
    running = []  # non-empty while the flash model runs (the eager reference may look at position_ids)
    model.register_forward_pre_hook(lambda *_: running.append(True))
    model.register_forward_hook(lambda *_: running.clear())

    def guard(original):
        def no_rediscovery(*args, **kwargs):
            assert not running, "cu_seqlens/max_seqlen must come from the batch, not from position_ids"
            return original(*args, **kwargs)

        return no_rediscovery

    prepare = modeling.prepare_fa_kwargs_from_position_ids
    monkeypatch.setattr(modeling, "prepare_fa_kwargs_from_position_ids", guard(prepare))
    find_packed = transformers.masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", guard(find_packed))
    check_packed_equals_alone(model, packs)
    num_layers = model.config.text_config.num_hidden_layers
    assert len(calls) > 0 and len(calls) % num_layers == 0
    first, second = (len(sample["input_ids"]) for sample in packs[0])
    assert calls[0].tolist()[:3] == [0, first, first + second]  # the collate's boundaries, as given


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_gpu_packed_batch_equals_samples_alone(attn, packs):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model = build(attn).to("cuda", torch.bfloat16)
    config = small_context_config()
    batch = collate_packs(packs, 96, crop_size=config.crop_size)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        start = 0
        for sample in packs[0]:
            end = start + len(sample["input_ids"])
            single = {k: v.cuda() for k, v in alone(sample).items() if k != "labels"}
            if "pixel_values" in single:
                single["pixel_values"] = single["pixel_values"].bfloat16()
            torch.testing.assert_close(logits[0, start:end], model(**single).logits[0].float(), rtol=0, atol=2e-2)
            start = end


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and liger_available()), reason="needs CUDA and liger-kernel")
def test_gpu_liger_loss_equals_chunked(packs):
    model = build("sdpa").cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packs(packs, 96, crop_size=56).items()}
    losses = []
    for impl in ("chunked", "liger"):
        model.loss_impl = impl
        losses.append(model(**batch).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_lm_and_clip_layers(packs):
    batch = collate_packs(packs, max_seq_len=64 + ORIGINAL, crop_size=56)
    grads, counts = [], []
    for checkpointing in (False, True):
        model = build("sdpa").train()
        if checkpointing:  # transformers 5 default: non-reentrant torch.utils.checkpoint per layer
            model.activation_checkpointing_enable()
        tower = model.model.vision_embed_tokens.img_processor["vision_model"]
        count = Counter()
        # pre-hooks: the non-reentrant recompute stops inside the MLP, once its last saved tensor is rebuilt
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: count.update(["lm"]))
        tower.encoder.layers[0].mlp.register_forward_pre_hook(lambda *_: count.update(["clip"]))
        model(**batch).loss.backward()
        counts.append(dict(count))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        if checkpointing:
            layers = [*model.model.layers, *tower.encoder.layers]
            assert all(layer.gradient_checkpointing for layer in layers)
            assert all(layer._gradient_checkpointing_func.keywords["use_reentrant"] is False for layer in layers)
    assert counts == [{"lm": 1, "clip": 1}, {"lm": 2, "clip": 2}]  # checkpointed layers run again in backward
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_freezing_groups_and_shared_embedding(packs):
    model = build("sdpa").train()
    names = {n for n, _ in model.named_parameters()}
    lm = {n for n in names if not n.startswith("model.vision_embed_tokens.")}
    vision = {n for n in names if ".img_processor." in n}
    never_run = {n for n in vision if ".encoder.layers.1." in n or "post_layernorm" in n}
    projector = names - lm - vision

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    counts = apply_freezing(model, freeze_vision=True)
    assert trainable() == lm | projector and "model.embed_tokens.weight" in trainable()  # the public-recipe bug
    assert counts["vision"] == 0 and counts["lm"] == sum(model.get_parameter(n).numel() for n in lm)
    apply_freezing(model, freeze_vision=True, freeze_projector=True)
    assert trainable() == lm
    apply_freezing(model, freeze_lm=True)
    assert trainable() == (vision - never_run) | projector
    apply_freezing(model, freeze_vision=True, freeze_lm=True)
    assert trainable() == projector
    batch = collate_packs(packs, max_seq_len=64 + ORIGINAL, crop_size=56)
    model(**batch).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == projector
    apply_freezing(model)  # nothing frozen, except the never-run last CLIP layer
    assert trainable() == names - never_run
    with pytest.raises(ValueError, match="nothing would be trained"):
        apply_freezing(model, True, True, True)


def test_model_loss_equals_full_logits_cross_entropy(packs):
    batch = collate_packs(packs, max_seq_len=64 + ORIGINAL, crop_size=56)
    results = []
    for chunked in (True, False):
        model = build("sdpa").train()
        model.loss_chunk_size = 16  # several chunks, some without labels
        if chunked:
            loss = model(**batch, num_items_in_batch=7).loss
        else:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, L, V]
            targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / 7
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    model.loss_impl = "liger"
    if not CUDA:
        with pytest.raises(RuntimeError, match="liger"):
            model(**batch)


def test_generate_greedy_equals_argmax_of_full_forward():
    config = small_context_config()
    model = build("sdpa")
    sample = make_sample(config, [(1, 2)], seed=40)
    prompt = sample["input_ids"][:-5]
    images = {"pixel_values": sample["pixel_values"], "image_sizes": sample["image_sizes"]}
    generated = model.generate_greedy(prompt, **images, max_new_tokens=4, stop_token_ids=())
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(4):
            next_id = model(ids, **images).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
    assert generated.tolist() == ids[0, len(prompt) :].tolist()
    stop = generated[1].item()
    stopped = model.generate_greedy(prompt, **images, max_new_tokens=4, stop_token_ids=(stop,))
    assert stopped.tolist() == generated[:2].tolist()


@pytest.mark.slow
def test_memory_benchmark_chunked_loss_needs_less_memory(tmp_path):
    out = tmp_path / "memory.json"
    script = str(ROOT / "bench/memory_loss.py")
    cmd = [sys.executable, script, "--tokens", "2048", "--chunk-sizes", "256", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    full, chunked = rows["full"], rows["chunked-256"]
    logits_mib = 2048 * 32064 * 4 / 2**20  # 250 MiB
    assert full["step_peak_mib"] > 2 * logits_mib  # logits + log-softmax + their gradients
    assert chunked["step_peak_mib"] < full["step_peak_mib"] / 3
    assert chunked["loss_rel_diff"] < 1e-6 and chunked["grad_hidden_max_abs_diff"] < 1e-6
    assert chunked["grad_weight_max_abs_diff"] < 1e-4


def _peaked_model(attn: str) -> Phi3VForCausalLM:
    """The longrope test config with a large init, so greedy argmaxes have no near-ties."""
    config = small_context_config()
    config.text_config.initializer_range = 0.5
    torch.manual_seed(0)
    return Phi3VForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_uncached(attn):
    """KV-cached greedy decoding (left-padded ragged rows, images) == re-running the whole sequence,
    for rows that stay short, rows already past the longrope switch, and a row that crosses it
    (that batch goes down the uncached path); the cache embeds each token once."""
    from phi3v_train.generate import _can_cache, greedy_generate, score_answers

    model = _peaked_model(attn)
    config = model.config
    short = [make_sample(config, c, seed=50 + i) for i, c in enumerate([[(1, 1)], [(1, 2)], []])]
    prompts = [{k: s[k] for k in ("input_ids", "pixel_values", "image_sizes")} | {"input_ids": s["input_ids"][:-5]}
               for s in short]
    lengths = [len(p["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3 and max(lengths) + 6 <= ORIGINAL  # ragged, short throughout
    embedded = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: embedded.append(args[0].numel()))
    cached = greedy_generate(model, prompts, max_new_tokens=6, batch_size=3, stop_token_id=-1, vocab_limit=32045)
    hook.remove()
    plain = greedy_generate(model, prompts, max_new_tokens=6, batch_size=3, stop_token_id=-1, vocab_limit=32045,
                            use_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain] and all(len(g.token_ids) == 6 for g in plain)
    assert embedded == [3 * max(lengths)] + [3] * 5  # the prompt once, then one token per row per step

    long_doc = make_sample(config, [(1, 2), (2, 1)], seed=31)
    long_prompts = [{"input_ids": long_doc["input_ids"][:-5], "pixel_values": long_doc["pixel_values"],
                     "image_sizes": long_doc["image_sizes"]}, prompts[0]]
    assert len(long_prompts[0]["input_ids"]) > ORIGINAL
    n_short = len(prompts[0]["input_ids"])
    assert _can_cache(model, [len(long_prompts[0]["input_ids"])], 6)
    assert _can_cache(model, [n_short], ORIGINAL - n_short + 1)  # last position fed: ORIGINAL - 1
    assert not _can_cache(model, [n_short], ORIGINAL - n_short + 2)  # ... ORIGINAL: crosses the switch
    for n in (6, 20):  # 20: the short row crosses, so the batch decodes uncached
        kw = dict(max_new_tokens=n, batch_size=2, stop_token_id=-1, vocab_limit=32045)
        alone = [greedy_generate(model, [p], use_cache=False, **kw)[0].token_ids for p in long_prompts]
        assert [g.token_ids for g in greedy_generate(model, long_prompts, **kw)] == alone
        assert greedy_generate(model, long_prompts[:1], **kw)[0].token_ids == alone[0]
    # teacher-forced scores of right-padded rows: a short row next to a long one scores as alone
    targets = [long_doc, short[0]]
    alone_scores = score_answers(model, targets, batch_size=1)
    batched = score_answers(model, targets, batch_size=2)
    assert [a.loss_sum for a in batched] == pytest.approx([a.loss_sum for a in alone_scores], rel=1e-5)
