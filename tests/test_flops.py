"""flops.py: the FLOP formula against torch's FlopCounterMode, per-document attention, peaks, MFU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from phi3v_train.data.collate import collate_packs
from phi3v_train.flops import (PEAK_FLOPS_BF16, FlopModel, batch_train_flops, document_lengths, mfu,
                               peak_flops_for_device, resolve_peak_flops)
from phi3v_train.model.config import load_model_config
from phi3v_train.model.modeling import Phi3VForCausalLM


@pytest.fixture(scope="module")
def tiny():
    config = load_model_config("tiny")
    torch.manual_seed(0)
    # eager attention: its matmuls are visible to FlopCounterMode (CPU SDPA kernels are not counted)
    model = Phi3VForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return config, model, FlopModel.from_config(config)


def _inputs(config, lengths, with_image=True):
    """One row per document (no padding), the first document with a 2x1-crop image."""
    S = config.crop_size
    T = max(lengths)
    assert all(n == T for n in lengths)
    ids = torch.randint(0, 1000, (len(lengths), T))
    n_img = config.num_image_tokens(2 * S, S)
    kwargs = {}
    if with_image:
        ids[0, 3:3 + n_img] = config.image_token_id
        kwargs = {"pixel_values": torch.randn(3, 3, S, S), "image_sizes": torch.tensor([[2 * S, S]])}
    return ids, kwargs, (3 if with_image else 0), (n_img if with_image else 0)


def count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_lm_matmul_params_match_the_model(tiny):
    config, model, fm = tiny
    lm = sum(m.weight.numel() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (n.startswith("model.layers.") or n == "lm_head"))
    assert fm.lm_matmul_params == lm
    # the real 4.15B on the meta device: non-embedding LM matmuls ~ 3.82B
    real = load_model_config("phi-3-vision-128k-instruct")
    with torch.device("meta"):
        big = Phi3VForCausalLM._from_config(real, dtype=torch.bfloat16)
    lm_big = sum(m.weight.numel() for n, m in big.named_modules()
                 if isinstance(m, torch.nn.Linear) and (n.startswith("model.layers.") or n == "lm_head"))
    assert FlopModel.from_config(real).lm_matmul_params == lm_big
    assert 3.7e9 < lm_big < 3.9e9


def test_forward_flops_equal_flop_counter(tiny):
    """One document per row: the formula is exactly what the matmuls do (LM, attention, CLIP, projector)."""
    config, model, fm = tiny
    ids, kw, crops, n_img = _inputs(config, [40, 40])
    with torch.no_grad():
        counted = count(lambda: model(input_ids=ids, **kw))
    assert counted == pytest.approx(fm.forward_flops([40, 40], crops, n_img), rel=1e-6)
    # text only: the 2-crop dummy vision pass is counted too
    ids, kw, crops, n_img = _inputs(config, [24], with_image=False)
    with torch.no_grad():
        counted = count(lambda: model(input_ids=ids))
    assert counted == pytest.approx(fm.forward_flops([24], 0, 0), rel=1e-6)


def test_training_flops_are_three_forward(tiny):
    """fwd + bwd counted = 3 x forward, up to the conv's missing input gradient (pixels need none)."""
    config, model, fm = tiny
    ids, kw, crops, n_img = _inputs(config, [40, 40])

    def step():
        model(input_ids=ids, **kw).logits.float().logsumexp(-1).sum().backward()

    ratio = count(step) / fm.train_flops([40, 40], crops, n_img)
    model.zero_grad(set_to_none=True)
    assert 0.99 < ratio <= 1.0


def test_attention_is_counted_per_document(tiny):
    """Packed documents: the formula's attention is the sum over documents of their own lengths
    squared -- what running each document alone costs -- not the pack length squared."""
    config, model, fm = tiny
    lengths = [10, 22, 32]
    ids = torch.randint(0, 1000, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        separately = sum(count(lambda s=s, n=n: model(input_ids=ids[:, s:s + n]))
                         for s, n in zip([0, 10, 32], lengths))
        packed_dense = count(lambda: model(input_ids=ids, position_ids=pos))  # eager: full L^2 with a mask
    vision_dummy = fm.forward_flops([], 0, 0)  # every forward runs the dummy vision pass once
    assert separately - 2 * vision_dummy == pytest.approx(fm.forward_flops(lengths, 0, 0), rel=1e-6)
    assert packed_dense > fm.forward_flops(lengths, 0, 0)  # a dense-mask kernel does extra (non-model) work
    assert packed_dense == pytest.approx(fm.forward_flops([sum(lengths)], 0, 0), rel=1e-6)


def test_document_lengths_and_batch_flops(tiny):
    config, _, fm = tiny

    def sample(n):
        ids = torch.randint(0, 1000, (n,))
        return {"input_ids": ids, "labels": ids.clone(), "key": str(n)}

    batch = collate_packs([[sample(5), sample(7)], [sample(16)], [sample(3)]], 16, crop_size=config.crop_size)
    assert document_lengths(batch) == [5, 7, 16, 3]  # padding tails (4 and 13 tokens) excluded
    assert batch_train_flops(fm, batch) == pytest.approx(fm.train_flops([5, 7, 16, 3], 0, 0))


def test_attention_term_and_causal_convention():
    fm = FlopModel.from_config("phi-3-vision-128k-instruct")
    six_n = 6 * fm.lm_matmul_params
    at_128k = fm.train_flops_per_token(131072) - six_n
    assert 6.0 < at_128k / six_n < 7.5  # ANCHORS: ~7x the 6N term at 128K for Phi-3-mini
    assert fm.train_flops_per_token(131072, causal=True) - six_n == pytest.approx(at_128k / 2)
    # vision: ViT-L/14-336 runs 23 of 24 layers over 577 tokens per crop: ~0.8 TFLOP forward... per 1000 crops
    assert fm.vision_tokens_per_crop == 577 and fm.vision_layers_run == 23
    assert 3.5e11 < fm.vision_flops_per_crop() < 4.5e11


def test_peak_table_override_and_mfu():
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_device("NVIDIA H200") == PEAK_FLOPS_BF16["h200"] == 989e12
    assert peak_flops_for_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_device("AMD EPYC 7B13") is None
    assert resolve_peak_flops(1.5) == 1.5e12
    assert resolve_peak_flops(None, "NVIDIA A100-PCIE-40GB") == 312e12
    assert mfu(312e12, 1.0, 2, 312e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None
