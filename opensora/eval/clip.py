"""CLIP (Radford et al. 2021): the image and text towers of a Hugging Face `CLIPModel`, in MindSpore.

Parameter names are transformers' `CLIPModel` state-dict keys, so a downloaded folder
(openai/clip-vit-base-patch32, openai/clip-vit-large-patch14, ...) loads by name:

    text_model.embeddings.{token,position}_embedding.weight          [vocab | max_pos, D_t]
    text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.{i}.layer_norm{1,2}.{weight,bias}
    text_model.encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    vision_model.embeddings.class_embedding                          [D_v]
    vision_model.embeddings.patch_embedding.weight                   [D_v, 3, p, p]  (conv, no bias)
    vision_model.embeddings.position_embedding.weight                [(S/p)^2 + 1, D_v]
    vision_model.pre_layrnorm.{weight,bias}                          (sic: HF's spelling)
    vision_model.encoder.layers.{i}....                              (as the text encoder)
    vision_model.post_layernorm.{weight,bias}
    visual_projection.weight [P, D_v], text_projection.weight [P, D_t] (no bias), logit_scale []

`*.position_ids` (a buffer older checkpoints carry) is not a parameter and is skipped.

The layouts differ only in config.json values: ViT-B/32 (patch 32, vision 768 x 12 layers x 12 heads,
text 512 x 12 x 8, projection 512) and ViT-L/14 (patch 14, vision 1024 x 24 x 16, text 768 x 12 x 12,
projection 768) both use quick_gelu (x * sigmoid(1.702 x)); LAION/OpenCLIP conversions use gelu.
Both towers are pre-LN transformers; the vision tower adds a LayerNorm before the encoder
(pre_layrnorm) and pools the class token through post_layernorm; the text tower is causal and pools
the hidden state at the EOS token (`eos_positions`, after final_layer_norm).

Text pooling follows transformers 4.57.6: configs with eos_token_id == 2 (the original openai configs,
written before HF PR #24773) take the position of the largest token id (argmax, as OpenAI's CLIP:
the EOT token has the largest id), others the first position of eos_token_id.

All computation is float32. `CLIPModel` builds the towers that are asked for (`with_text`,
`with_vision`), so an image-only scorer does not hold the text tower. `CLIP` puts the model, the
tokenizer and the image processor of one folder together (see opensora/eval/clip_processing.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from opensora.model.layers import LayerNorm as _LayerNorm
from opensora.model.layers import Linear, scaled_dot_product_attention
from opensora.text_encoder.t5 import Embedding

log = logging.getLogger(__name__)

LEGACY_EOS_TOKEN_ID = 2
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.ckpt")
SKIPPED_SUFFIXES = (".position_ids",)
FP32_MIN = float(np.finfo(np.float32).min)


# ================================================================
# Config (the fields of transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig, same defaults)
# ================================================================


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


def _pick(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class CLIPConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        for name, c in (("text_config", self.text), ("vision_config", self.vision)):
            if c.hidden_size % c.num_attention_heads:
                raise ValueError(f"{name}: hidden_size={c.hidden_size} is not divisible by "
                                 f"num_attention_heads={c.num_attention_heads}")
            if c.hidden_act not in ACTIVATIONS:
                raise ValueError(f"{name}: hidden_act={c.hidden_act!r} is not supported (supported: "
                                 f"{sorted(ACTIVATIONS)})")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        """From a Hugging Face CLIPModel config.json. As transformers does, `text_config_dict` /
        `vision_config_dict` (older files) update `text_config` / `vision_config`; absent fields take
        transformers' defaults."""
        if "text_config" not in d and "vision_config" not in d:
            raise ValueError(f"not a CLIPModel config (model_type {d.get('model_type')!r}): it has no text_config or "
                             "vision_config; a CLIPModel folder (e.g. openai/clip-vit-large-patch14) is needed")
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return cls(_pick(CLIPTextConfig, text), _pick(CLIPVisionConfig, vision),
                   int(d.get("projection_dim", 512)), float(d.get("logit_scale_init_value", 2.6592)))

    @classmethod
    def from_json(cls, path) -> "CLIPConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ================================================================
# Layers
# ================================================================


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (transformers' "quick_gelu")."""
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: ops.gelu(x, approximate="none"),
    "gelu_new": lambda x: ops.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: ops.gelu(x, approximate="tanh"),
    "relu": ops.relu,
}


class LayerNorm(_LayerNorm):
    """torch.nn.LayerNorm with its affine `weight` / `bias` (the normalisation is layers.LayerNorm's)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(eps)
        self.weight = ms.Parameter(ms.Tensor(np.ones(dim, np.float32)), name="weight")
        self.bias = ms.Parameter(ms.Tensor(np.zeros(dim, np.float32)), name="bias")

    def construct(self, x):
        return super().construct(x) * self.weight + self.bias


class CLIPAttention(nn.Cell):
    """Multi-head self-attention with biased q/k/v/out projections, scale head_dim^-0.5."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def construct(self, x, bias=None):
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).reshape(b, n, h, d).transpose(0, 2, 1, 3)  # [B, N, C] -> [B, H, N, d]
        k = self.k_proj(x).reshape(b, n, h, d).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, h, d).transpose(0, 2, 1, 3)
        out = scaled_dot_product_attention(q, k, v, self.scale, bias=bias)  # [B, H, N, d]
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))  # -> [B, N, C]


class CLIPMLP(nn.Cell):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def construct(self, x, bias=None):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers)])

    def construct(self, x, bias=None):
        for layer in self.layers:
            x = layer(x, bias)
        return x


# ================================================================
# Text tower
# ================================================================


def eos_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Where the text tower pools, per row of input_ids [B, L]: argmax of the ids when eos_token_id is the
    legacy 2 (OpenAI's rule: EOT has the largest id), else the first position holding eos_token_id
    (transformers 4.57.6 `CLIPTextTransformer`; 0 when a row has none, as its argmax gives). int32 [B]."""
    ids = np.asarray(input_ids)
    if int(eos_token_id) == LEGACY_EOS_TOKEN_ID:
        return ids.argmax(-1).astype(np.int32)  # numpy and torch both return the first maximum
    return (ids == int(eos_token_id)).argmax(-1).astype(np.int32)


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = Embedding(c.max_position_embeddings, c.hidden_size)

    def construct(self, input_ids):
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]  # [B, L, D]


class CLIPTextTransformer(nn.Cell):
    """(input_ids [B, L] int32, pool_index [B] int32) -> pooled output [B, D_t]."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.config = c
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        n = c.max_position_embeddings
        causal = np.triu(np.full((n, n), FP32_MIN, np.float32), k=1)  # key j > query i is masked
        self.causal_bias = ms.Tensor(causal[None, None])  # [1, 1, L, L]

    def construct(self, input_ids, pool_index):
        b, n = input_ids.shape
        x = self.embeddings(input_ids)
        x = self.encoder(x, self.causal_bias[:, :, :n, :n])  # [B, L, D]
        flat = pool_index + ops.arange(0, b, dtype=ms.int32) * n
        x = ops.gather(x.reshape(b * n, -1), flat, 0)  # the EOS token's state: [B, D]
        return self.final_layer_norm(x)


# ================================================================
# Vision tower
# ================================================================


class PatchEmbedding(nn.Cell):
    """The patch conv (kernel = stride = p, no bias; torch weight [D, C, p, p]) as one matmul over
    non-overlapping patches: [B, C, H, W] -> [B, (H/p)*(W/p), D], patches in row-major order."""

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.weight = ms.Parameter(ms.Tensor(np.zeros((dim, channels, patch, patch), np.float32)), name="weight")
        self.matmul_nt = ops.MatMul(transpose_b=True)

    def construct(self, x):
        b, c, h, w = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = x[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
        x = self.matmul_nt(x.reshape(b * gh * gw, c * p * p), self.weight.reshape(self.dim, -1))
        return x.reshape(b, gh * gw, self.dim)


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.image_size = c.image_size
        self.class_embedding = ms.Parameter(ms.Tensor(np.zeros(c.hidden_size, np.float32)), name="class_embedding")
        self.patch_embedding = PatchEmbedding(c.num_channels, c.hidden_size, c.patch_size)
        self.position_embedding = Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def construct(self, pixel_values):
        x = self.patch_embedding(pixel_values)  # [B, N, D]
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (x.shape[0], 1, x.shape[2]))
        x = ops.concat([cls, x], axis=1)  # [B, N + 1, D]
        return x + self.position_embedding.weight


class CLIPVisionTransformer(nn.Cell):
    """pixel_values [B, 3, S, S] (normalised) -> pooled output [B, D_v] (class token after post_layernorm)."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.config = c
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def construct(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = self.encoder(x)  # [B, N + 1, D]
        return self.post_layernorm(x[:, 0])


# ================================================================
# Model
# ================================================================


class CLIPModel(nn.Cell):
    """transformers' CLIPModel (inference): `get_image_features`, `get_text_features` (projected, not
    normalised) and `construct` -> (logits_per_image [B_i, B_t], logits_per_text, text_embeds, image_embeds)
    with unit-norm embeds and logits = exp(logit_scale) * cos."""

    def __init__(self, config: CLIPConfig, with_text: bool = True, with_vision: bool = True):
        super().__init__()
        if not (with_text or with_vision):
            raise ValueError("CLIPModel needs at least one tower (with_text or with_vision)")
        self.config, self.with_text, self.with_vision = config, with_text, with_vision
        p = config.projection_dim
        if with_text:
            self.text_model = CLIPTextTransformer(config.text)
            self.text_projection = Linear(config.text.hidden_size, p, has_bias=False)
        if with_vision:
            self.vision_model = CLIPVisionTransformer(config.vision)
            self.visual_projection = Linear(config.vision.hidden_size, p, has_bias=False)
        self.logit_scale = ms.Parameter(ms.Tensor(np.float32(config.logit_scale_init_value)), name="logit_scale")

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))  # [B, P]

    def get_text_features(self, input_ids, pool_index):
        return self.text_projection(self.text_model(input_ids, pool_index))  # [B, P]

    def construct(self, pixel_values, input_ids, pool_index):
        image = self.get_image_features(pixel_values)
        text = self.get_text_features(input_ids, pool_index)
        image = image / ops.norm(image, dim=-1, keepdim=True)
        text = text / ops.norm(text, dim=-1, keepdim=True)
        logits_per_text = ops.matmul(text, image.T) * ops.exp(self.logit_scale)
        return logits_per_text.T, logits_per_text, text, image


# ================================================================
# Loading a Hugging Face folder
# ================================================================


def find_weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no CLIP weights found (expected one of {list(WEIGHT_FILES)}; sharded "
                            "checkpoints are not supported: save the model as one file)")


def load_clip_weights(model: CLIPModel, path) -> list[str]:
    """Copy the tensors of a CLIPModel checkpoint file (.safetensors, .bin read with torch weights_only,
    .ckpt) into `model` by name. Every parameter of the built towers must be present with its shape;
    the other tower's tensors and `position_ids` buffers are skipped; other unknown tensors raise.
    Returns the names loaded."""
    from opensora.model.pretrained import plan_load, read_tensors

    params = dict(model.parameters_and_names())
    source = read_tensors(path)
    skipped_prefixes = (() if model.with_text else ("text_model.", "text_projection.")) + \
        (() if model.with_vision else ("vision_model.", "visual_projection."))
    report, plan = plan_load(params, source)
    unexpected = [k for k in report.unexpected if not k.endswith(SKIPPED_SUFFIXES) and not k.startswith(skipped_prefixes)]
    if report.missing or report.mismatched or unexpected:
        lines = [f"{path} does not match the CLIP model of its config.json:"]
        if report.mismatched:
            lines.append("  shape mismatches (name: file -> model): " + "; ".join(
                f"{k}: {list(g)} -> {list(w)}" for k, g, w in report.mismatched[:6]))
        if report.missing:
            lines.append(f"  missing {len(report.missing)} of {len(params)} tensors, e.g. " + ", ".join(
                report.missing[:6]))
        if unexpected:
            lines.append(f"  unexpected tensors, e.g. {', '.join(unexpected[:6])}")
        lines.append("  Expected the weights of a transformers CLIPModel (e.g. openai/clip-vit-large-patch14) with "
                     "the config.json saved beside them.")
        raise ValueError("\n".join(lines))
    for name in plan:
        params[name].set_data(ms.Tensor(np.ascontiguousarray(source.read(name), dtype=np.float32)))
    return list(plan)


def check_folder(folder, config_key: str = "clip.from_pretrained") -> Path:
    """The folder as a Path, after checking it holds config.json; errors name `config_key`."""
    path = Path(folder) if folder else None
    hint = ("a Hugging Face CLIPModel folder as downloaded, e.g. `huggingface-cli download "
            "openai/clip-vit-large-patch14 --local-dir models/clip-vit-large-patch14` (config.json, model.safetensors "
            "or pytorch_model.bin, tokenizer.json or vocab.json + merges.txt, preprocessor_config.json)")
    if path is None:
        raise ValueError(f"{config_key} is not set: point it at {hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"{config_key}={folder} does not exist: it must be {hint}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{config_key}={folder} has no config.json: it must be {hint}")
    return path


def batched_call(fn, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """fn(*tensors) over the rows of `arrays` in batches of `batch_size` -> float32 numpy, rows in order. In
    GRAPH_MODE the last batch is padded (with copies of its last row) so one graph serves every batch."""
    n = arrays[0].shape[0]
    pad = ms.get_context("mode") == ms.GRAPH_MODE
    out = []
    for s in range(0, n, batch_size):
        chunk = [a[s:s + batch_size] for a in arrays]
        k = chunk[0].shape[0]
        if pad and k < batch_size:
            chunk = [np.concatenate([a, np.repeat(a[-1:], batch_size - k, axis=0)]) for a in chunk]
        out.append(fn(*[ms.Tensor(np.ascontiguousarray(a)) for a in chunk]).asnumpy()[:k])
    return np.concatenate(out).astype(np.float32, copy=False)


class CLIP:
    """A CLIP folder ready to score: the model (`with_text` / `with_vision` towers), its tokenizer and
    its image processor.

    `image_features(pixel_values)` and `text_features(texts)` return float32 numpy [N, P], unit-norm
    when `normalize`; inputs are run in batches of `batch_size`, the last one padded in GRAPH_MODE so
    one graph is compiled per tower. `logit_scale` is exp(the model's logit_scale) (100 for OpenAI's).
    """

    def __init__(self, from_pretrained: str, batch_size: int = 16, with_text: bool = True,
                 with_vision: bool = True, config_key: str = "clip.from_pretrained"):
        from opensora.eval.clip_processing import CLIPImageProcessor, CLIPTokenizer

        folder = check_folder(from_pretrained, config_key)
        self.folder = folder
        self.config = CLIPConfig.from_json(folder / "config.json")
        self.model = CLIPModel(self.config, with_text, with_vision)
        self.model.set_train(False)
        self.weights_file = find_weight_file(folder)
        load_clip_weights(self.model, self.weights_file)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"CLIP batch_size={batch_size} must be >= 1")
        self.tokenizer = CLIPTokenizer.from_folder(folder, self.config.text.max_position_embeddings) if with_text \
            else None
        self.processor = CLIPImageProcessor.from_folder(folder, self.config.vision.image_size) if with_vision \
            else None
        self.logit_scale = float(np.exp(self.model.logit_scale.asnumpy()))
        c = self.config
        log.info("CLIP from %s: vision %dx%d layers, patch %d, %d px; text %dx%d layers; projection %d; "
                 "logit scale %.4g", folder, c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.patch_size,
                 c.vision.image_size, c.text.hidden_size, c.text.num_hidden_layers, c.projection_dim,
                 self.logit_scale)

    @staticmethod
    def _normalize(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def image_features(self, pixel_values: np.ndarray, normalize: bool = True) -> np.ndarray:
        """pixel_values [N, 3, S, S] float32 (from `self.processor`) -> [N, P]."""
        if not self.model.with_vision:
            raise ValueError("this CLIP was built without its vision tower")
        pixel_values = np.asarray(pixel_values, np.float32)
        if len(pixel_values) == 0:
            return np.zeros((0, self.config.projection_dim), np.float32)
        x = batched_call(self.model.get_image_features, (pixel_values,), self.batch_size)
        return self._normalize(x) if normalize else x

    def images_features(self, images: Sequence[np.ndarray], normalize: bool = True) -> np.ndarray:
        """uint8 RGB images [H, W, 3] -> [N, P] (preprocessed here)."""
        return self.image_features(self.processor(images), normalize)

    def text_features(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        if not self.model.with_text:
            raise ValueError("this CLIP was built without its text tower")
        if len(texts) == 0:
            return np.zeros((0, self.config.projection_dim), np.float32)
        ids, _ = self.tokenizer(list(texts))
        pool = eos_positions(ids, self.config.text.eos_token_id)
        x = batched_call(self.model.get_text_features, (ids, pool), self.batch_size)
        return self._normalize(x) if normalize else x


def build_clip(clip_cfg, **kwargs) -> CLIP:
    """The configured `clip` (a `_target_` config such as conf/clip/vit_l14.yaml), its folder checked first so
    that a missing one is reported plainly, naming clip.from_pretrained."""
    from hydra.utils import instantiate

    check_folder(clip_cfg.get("from_pretrained"))
    return instantiate(clip_cfg, **kwargs)
