"""Phi-3-Vision configuration: a composite of transformers' `Phi3Config` and `CLIPVisionConfig`.

The official `config.json` of `microsoft/Phi-3-vision-128k-instruct` / `Phi-3.5-vision-instruct`
is flat (Phi-3 text keys at the top level, plus `img_processor` and `embd_layer`) and uses the
legacy rope scaling `{"type": "su"}`. `Phi3VConfig.from_official` translates it into the nested
form used here; `to_official` goes back. Facts and constants: `docs/PHI3V_SPEC.md` (shared).

Our extensions to the official format (ignored by the official remote code):
- `vision_config`: a `CLIPVisionConfig` dict, for tiny test models (default: CLIP ViT-L/14-336);
- `num_crops`: the HD-transform crop budget (officially in `preprocessor_config.json`);
- `image_token_id`: the image placeholder id (default `<|image|>` = 32044).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# CLIP ViT-L/14 at 336 px, the vision tower of both official checkpoints (spec: "Config").
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

IMAGE_TOKEN_ID = 32044  # `<|image|>` in the Phi-3-V tokenizer
DEFAULT_NUM_CROPS = 16  # Phi-3-V preprocessor default (3.5-V uses 4)

# Flat keys of the official config.json that belong to the language model.
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
    "max_position_embeddings", "original_max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "sliding_window",
)  # fmt: skip
# Official keys that describe the saving environment, not the model (keys starting with "_" go too).
_DROPPED_KEYS = ("transformers_version", "auto_map", "model_type")
# The official `embd_layer`, the only image-embedding variant the checkpoints (and we) implement.
_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}

_ASSETS = Path(__file__).resolve().parents[1] / "assets"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_NAMED_CONFIGS = {
    "phi-3-vision-128k-instruct": _ASSETS / "phi3v",
    "phi-3.5-vision-instruct": _ASSETS / "phi3_5v",
    "tiny": _REPO_ROOT / "configs" / "model" / "tiny.json",
}


class Phi3VConfig(PreTrainedConfig):
    """Phi-3-Vision: a Phi-3 language model, a CLIP vision tower and the HD image embedding.

    Build it from an official `config.json` with `Phi3VConfig.from_official(...)` or
    `load_model_config(name_or_path)`; the constructor takes the nested form
    (`text_config=..., vision_config=...`) that `save_pretrained` writes.
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "text_config": Phi3Config,
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L14_336),
    }

    text_config: dict | PreTrainedConfig | None = None
    """The language model (`Phi3Config`); default: transformers' Phi-3 defaults."""
    vision_config: dict | PreTrainedConfig | None = None
    """The vision tower (`CLIPVisionConfig`); default: CLIP ViT-L/14-336."""
    image_token_id: int = IMAGE_TOKEN_ID
    """Token id that marks one image-feature position in `input_ids`."""
    num_crops: int = DEFAULT_NUM_CROPS
    """HD-transform crop budget: the most sub-crops per image (the global view comes on top)."""
    tie_word_embeddings: bool = False
    """Phi-3-V has an untied `lm_head`."""

    @property
    def crop_size(self) -> int:
        """Side of one square crop in pixels (= the CLIP image size, 336 for the real model)."""
        return self.vision_config.image_size

    @property
    def patch_size(self) -> int:
        """CLIP patch side in pixels (14 for the real model)."""
        return self.vision_config.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of image tokens of one image whose HD size is `height` x `width` pixels.

        Spec ("Image tokens"), with g = crop_size / patch_size and h = g / 2 (2x2 merge):
        `(hc*wc + 1) * h*h + 1 + (hc + 1) * h` where hc = height / crop_size, wc = width / crop_size.
        Raises ValueError when a side is not a positive multiple of the crop size.
        """
        crop = self.crop_size
        if height <= 0 or width <= 0 or height % crop or width % crop:
            raise ValueError(f"HD image size ({height}, {width}) must be positive multiples of {crop}")
        hc, wc, h = height // crop, width // crop, crop // self.patch_size // 2
        return (hc * wc + 1) * h * h + 1 + (hc + 1) * h

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' config reader, plus: an official flat config.json without `num_crops` takes it
        from the `preprocessor_config.json` next to it (16 for 3-V, 4 for 3.5-V), like `load_model_config`."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        preprocessor = Path(str(pretrained_model_name_or_path)) / "preprocessor_config.json"
        if "text_config" not in config_dict and "num_crops" not in config_dict and preprocessor.is_file():
            num_crops = json.loads(preprocessor.read_text()).get("num_crops")
            if num_crops is not None:
                config_dict = {**config_dict, "num_crops": num_crops}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> Phi3VConfig:
        """transformers' loader entry (`from_pretrained`): official flat dicts go through `from_official`,
        so `Phi3VForCausalLM.from_pretrained(<official checkpoint dir>)` works as is (num_crops comes from
        the directory's preprocessor_config.json, see `get_config_dict`, else 16)."""
        if "text_config" not in config_dict and "img_processor" in config_dict:
            config_dict = cls.from_official(config_dict).to_dict()
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_official(cls, official: dict | str | Path, num_crops: int | None = None) -> Phi3VConfig:
        """Translate an official Phi-3-V `config.json` (a dict, or a path to it) into a `Phi3VConfig`.

        - Flat Phi-3 keys go to `text_config`. The legacy `rope_scaling={"type": "su", ...}` becomes
          `rope_parameters={"rope_type": "longrope", ...}` (spec PITFALL: transformers 5 raises a
          KeyError on "su"); `factor` = max_position_embeddings / original_max_position_embeddings,
          the value transformers would derive anyway, set explicitly to silence its warning.
        - `vision_config` (our extension) is used when present, else CLIP ViT-L/14-336.
        - `num_crops`: the dict's key, else the argument, else 16.
        - `auto_map`, `transformers_version` and keys starting with "_" (`_attn_implementation`,
          `_name_or_path`, comments) are dropped.
        Raises NotImplementedError for image-embedding variants the checkpoints do not use.
        """
        if not isinstance(official, dict):
            official = json.loads(Path(official).read_text())
        d = {k: v for k, v in official.items() if k not in _DROPPED_KEYS and not k.startswith("_")}
        img_processor = d.pop("img_processor", None) or {}
        embd_layer = d.pop("embd_layer", None) or {}
        unsupported = {k: v for k, v in embd_layer.items() if _EMBD_LAYER.get(k) != v}
        if img_processor.get("name", "clip_vision_model") != "clip_vision_model" or unsupported:
            raise NotImplementedError(
                f"only the CLIP + HD 'sub_glb' MLP embedding is implemented; got img_processor="
                f"{img_processor}, unsupported embd_layer entries {unsupported}"
            )
        if img_processor.get("layer_idx", -2) != -2 or img_processor.get("type_feature", "patch") != "patch":
            raise NotImplementedError(f"only layer_idx=-2 patch features are implemented: {img_processor}")

        text = {k: d.pop(k) for k in _TEXT_KEYS if k in d}
        rope_theta = d.pop("rope_theta", 10000.0)
        rope_scaling = d.pop("rope_scaling", None)
        if rope_scaling is None:
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
        else:
            rope_type = rope_scaling.get("type", rope_scaling.get("rope_type"))
            if rope_type not in ("su", "longrope"):
                raise NotImplementedError(f"rope_scaling type {rope_type!r} (expected 'su' or 'longrope')")
            original = text.get("original_max_position_embeddings", 4096)
            text["rope_parameters"] = {
                "rope_type": "longrope",
                "short_factor": list(rope_scaling["short_factor"]),
                "long_factor": list(rope_scaling["long_factor"]),
                "original_max_position_embeddings": original,
                "factor": text.get("max_position_embeddings", original) / original,
                "rope_theta": rope_theta,
            }
        vision = d.pop("vision_config", None) or dict(CLIP_VIT_L14_336)
        num_crops = d.pop("num_crops", num_crops if num_crops is not None else DEFAULT_NUM_CROPS)
        if "torch_dtype" in d:
            d["dtype"] = d.pop("torch_dtype")
        return cls(text_config=text, vision_config=vision, num_crops=num_crops, **d)

    def to_official(self) -> dict[str, Any]:
        """Return the official flat `config.json` dict; `from_official` of it gives this config back.

        The rope scaling is written as `{"type": "su", ...}` like the official files, so the export also
        loads with the checkpoint's own remote code. `vision_config` is written only when it differs
        from CLIP ViT-L/14-336.
        """
        text = self.text_config.to_dict()
        out: dict[str, Any] = {
            "architectures": ["Phi3VForCausalLM"],
            "auto_map": dict(_AUTO_MAP),
            "model_type": self.model_type,
            "embd_layer": dict(_EMBD_LAYER),
            "img_processor": {
                "image_dim_out": self.vision_config.hidden_size,
                "model_name": "openai/clip-vit-large-patch14-336",
                "name": "clip_vision_model",
                "num_img_tokens": (self.crop_size // self.patch_size // 2) ** 2,
            },
            **{k: text[k] for k in _TEXT_KEYS if k in text},
            "image_token_id": self.image_token_id,
            "num_crops": self.num_crops,
        }
        rope = self.text_config.rope_parameters
        out["rope_theta"] = rope["rope_theta"]
        if rope["rope_type"] == "longrope":
            out["rope_scaling"] = {
                "long_factor": list(rope["long_factor"]),
                "short_factor": list(rope["short_factor"]),
                "type": "su",
            }
        vision = self.vision_config.to_dict()
        if any(vision.get(k) != v for k, v in CLIP_VIT_L14_336.items()):
            out["vision_config"] = {k: vision[k] for k in (*CLIP_VIT_L14_336, "initializer_range")}
        if self.dtype is not None:
            out["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        return out


def load_model_config(name_or_path: str | Path) -> Phi3VConfig:
    """Load a `Phi3VConfig` by name or path.

    Names (case-insensitive, an optional "microsoft/" prefix is ignored): "phi-3-vision-128k-instruct"
    and "phi-3.5-vision-instruct" (the bundled official configs), "tiny" (`configs/model/tiny.json`
    in the repository root). Otherwise a path to an official-style config.json, or to a directory
    holding one; `num_crops` then comes from a `preprocessor_config.json` next to it when the config
    has none. Raises FileNotFoundError when nothing is found.
    """
    key = str(name_or_path).lower().removeprefix("microsoft/")
    path = _NAMED_CONFIGS.get(key, Path(name_or_path))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no model config at {path}: pass one of {sorted(_NAMED_CONFIGS)}, a config.json, or its directory"
        )
    num_crops = None
    preprocessor = path.parent / "preprocessor_config.json"
    if preprocessor.is_file():
        num_crops = json.loads(preprocessor.read_text()).get("num_crops")
    return Phi3VConfig.from_official(path, num_crops=num_crops)

