"""T5Embedder: caption cleaning + tokenizer + frozen T5 encoder, loaded from a Hugging Face folder
or built at random for the tiny demo; and the loader of HF T5 weights.

A Hugging Face folder holds `config.json`, `spiece.model` (optionally `tokenizer_config.json`)
and the weights as one of, in this order of preference:
    model.safetensors | model.safetensors.index.json + shards |
    model.ckpt (MindSpore, as `task=convert task.component=text_encoder` writes it) |
    pytorch_model.bin | pytorch_model.bin.index.json + shards      (.bin needs torch)
Full T5 (encoder-decoder) checkpoints such as DeepFloyd/t5-v1_1-xxl load too: `decoder.*` and
`lm_head.*` are skipped, and shards holding only those are not read.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import mindspore as ms

from opensora.text_encoder.clean import text_preprocessing
from opensora.text_encoder.t5 import T5Config, T5Encoder
from opensora.text_encoder.tokenizer import T5Tokenizer
from opensora.utils.tensor_files import open_tensors, resolve_dtype, to_numpy

log = logging.getLogger(__name__)

_SKIPPED_PREFIXES = ("decoder.", "lm_head.")
_EMBED_ALIAS = {"encoder.embed_tokens.weight": "shared.weight"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model.ckpt", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _load_index(index_path: Path) -> dict[str, str]:
    with open(index_path) as f:
        return json.load(f)["weight_map"]


def resolve_weight_files(folder, wanted=None) -> list[Path]:
    """The weight files of an HF folder that hold any of `wanted` keys (all when None).
    Raises FileNotFoundError naming the missing file (no weights at all, or a missing shard)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = _load_index(path)
        shards = sorted({s for k, s in weight_map.items() if wanted is None or k in wanted})
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shard file(s) {missing} listed in {name} are missing")
        return [folder / s for s in shards]
    raise FileNotFoundError(f"{folder}: no T5 weights found (expected one of {list(WEIGHT_FILES)})")


# ================================================================
# Loading into T5Encoder
# ================================================================


@dataclass
class LoadReport:
    """What load_hf_t5_weights did. `missing`: encoder parameters not in the checkpoint;
    `unexpected`: checkpoint keys the encoder has no place for; `skipped`: decoder / lm_head
    keys and duplicate embedding aliases, ignored on purpose."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __str__(self):
        return (f"loaded {len(self.loaded)} tensors from {len(self.files)} file(s); missing {self.missing}; "
                f"unexpected {self.unexpected}; skipped {len(self.skipped)}")


def load_hf_t5_weights(encoder: T5Encoder, folder) -> LoadReport:
    """Copy the weights of an HF T5 folder into `encoder` (names are identical; the token embedding
    may be stored as `shared.weight` or `encoder.embed_tokens.weight`). Shape mismatches raise."""
    folder = Path(folder)
    params = {name: p for name, p in encoder.parameters_and_names()}
    wanted = set(params) | set(_EMBED_ALIAS)
    files = resolve_weight_files(folder, wanted)
    report = LoadReport(files=[str(f) for f in files])
    all_keys = []  # every key of the checkpoint, including those in shards not read
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            if name.endswith(".index.json"):
                all_keys.extend(k for k in _load_index(folder / name) if k not in wanted)
            break
    for path in files:
        source = open_tensors(path, unwrap=False)  # a file holding pickled objects is refused, naming it
        all_keys.extend(source.shapes)
        tensors = source.load(wanted)
        for key, arr in tensors.items():
            name = _EMBED_ALIAS.get(key, key)
            if name not in params:
                continue
            if name in report.loaded:  # shared.weight and encoder.embed_tokens.weight both present
                report.skipped.append(key)
                continue
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(arr.shape)}, the encoder expects {tuple(p.shape)}")
            p.set_data(ms.Tensor(np.ascontiguousarray(arr, dtype=np.float32), p.dtype))
            report.loaded.append(name)
        del tensors
    for key in dict.fromkeys(all_keys):
        name = _EMBED_ALIAS.get(key, key)
        if name in params:
            continue
        (report.skipped if key.startswith(_SKIPPED_PREFIXES) else report.unexpected).append(key)
    report.missing = [n for n in params if n not in report.loaded]
    return report


# ================================================================
# Embedder
# ================================================================


class T5Embedder:
    """Prompts -> {"y": float32 [B, 1, L, d_model], "mask": int32 [B, L]} with a frozen T5 encoder.

    `from_pretrained`: an HF folder (config.json, spiece.model, weights; `tokenizer_path`
    overrides its spiece.model). Otherwise `config` (T5Config fields) and `tokenizer_path` give a
    randomly initialised encoder (seeded), as used by the tiny demo. `clean_caption` applies
    PixArt's caption cleaning (twice, as in training) before tokenising. Results are cached per
    prompt (LRU, about `cache_mb` MiB). `output_dim`, when given (configs state it for the
    diffusion model's caption_channels), must equal d_model.
    """

    def __init__(self, from_pretrained: Optional[str] = None, config: Optional[dict] = None,
                 tokenizer_path: Optional[str] = None, model_max_length: int = 120, dtype: str = "fp32",
                 seed: int = 0, clean_caption: bool = True, cache_mb: float = 512, output_dim: Optional[int] = None):
        self.dtype = resolve_dtype(dtype, "text_encoder.dtype")
        if self.dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
            raise ValueError("T5Embedder dtype=bf16: MindSpore has no bfloat16 MatMul kernel on CPU; use fp32 or fp16")
        self.model_max_length = int(model_max_length)
        self.clean_caption = clean_caption
        self.load_report = None
        if from_pretrained is not None:
            folder = Path(from_pretrained)
            if not folder.is_dir():
                raise FileNotFoundError(f"T5 folder not found: {folder}")
            if config is not None:
                log.warning("T5Embedder: from_pretrained given, ignoring `config` (config.json is used)")
            cfg_file = folder / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(f"{folder}: config.json is missing")
            self.config = T5Config.from_json(cfg_file)
            tok = Path(tokenizer_path) if tokenizer_path else folder / "spiece.model"
            if not tok.is_file():
                raise FileNotFoundError(f"{folder}: tokenizer file {tok.name} is missing ({tok})")
            extra_ids = self._extra_ids_of(folder)
            self.model = T5Encoder(self.config, self.dtype, seed=None)
            self.load_report = load_hf_t5_weights(self.model, folder)
            if self.load_report.missing:
                raise KeyError(f"{folder}: checkpoint lacks encoder weights {self.load_report.missing}")
            if self.load_report.unexpected:
                log.warning("T5 checkpoint %s has unexpected keys %s", folder, self.load_report.unexpected)
            log.info("T5 encoder from %s: %s", folder, self.load_report)
        else:
            if config is None or tokenizer_path is None:
                raise ValueError("T5Embedder needs from_pretrained, or both config and tokenizer_path")
            self.config = config if isinstance(config, T5Config) else T5Config(**{k: config[k] for k in config})
            tok = Path(tokenizer_path)
            extra_ids = 100
            self.model = T5Encoder(self.config, self.dtype, seed=seed)
        self.tokenizer = self._make_tokenizer(tok, extra_ids)
        self.model.set_train(False)
        for p in self.model.get_parameters():
            p.requires_grad = False
        self.output_dim = self.config.d_model
        if output_dim is not None and int(output_dim) != self.output_dim:
            raise ValueError(f"output_dim={output_dim} but the T5 encoder has d_model={self.output_dim}")
        per_entry = self.model_max_length * (self.config.d_model * 4 + 4)
        self._cache_entries = max(1, int(cache_mb * 2 ** 20) // per_entry)
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @staticmethod
    def _extra_ids_of(folder: Path) -> int:
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            with open(cfg) as f:
                return int(json.load(f).get("extra_ids", 100))
        return 100

    def _make_tokenizer(self, path: Path, extra_ids: int) -> T5Tokenizer:
        """Sentinel ids must fit the embedding table: a tiny vocab gets fewer (or no) sentinels."""
        tok = T5Tokenizer(str(path), extra_ids=0)
        room = self.config.vocab_size - tok.sp_size
        if room < 0:
            raise ValueError(f"tokenizer {path} has {tok.sp_size} pieces but the encoder's vocab_size is "
                             f"{self.config.vocab_size}")
        if extra_ids > room:
            log.info("T5 tokenizer: %d sentinel ids do not fit vocab_size %d, using %d", extra_ids,
                     self.config.vocab_size, room)
            extra_ids = room
        return T5Tokenizer(str(path), extra_ids=extra_ids)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [text_preprocessing(p) if self.clean_caption else p for p in prompts]
        return self.tokenizer(texts, self.model_max_length)

    def _run(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encoder on a batch padded to a power of two (fewer distinct shapes to compile)."""
        n = len(prompts)
        size = 1 << (n - 1).bit_length()
        ids, mask = self.tokenize(prompts + [prompts[-1]] * (size - n))
        y = self.model(ms.Tensor(ids), ms.Tensor(mask))  # [B, L, C]
        return y.asnumpy().astype(np.float32)[:n], mask[:n]

    def encode(self, prompts: Sequence[str]) -> dict:
        prompts = [str(p) for p in prompts]
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            y, mask = self._run(todo)
            for i, p in enumerate(todo):
                self._cache[p] = (y[i], mask[i])
        for p in dict.fromkeys(prompts):
            self._cache.move_to_end(p)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > max(self._cache_entries, len(set(prompts))):
            self._cache.popitem(last=False)
        y = np.stack([r[0] for r in rows])[:, None]  # [B, 1, L, C]
        mask = np.stack([r[1] for r in rows]).astype(np.int32)  # [B, L]
        return {"y": y, "mask": mask}

    def save_pretrained(self, folder: str) -> None:
        """Write an HF folder (config.json, spiece.model, tokenizer_config.json, model.safetensors)
        that `T5Embedder(from_pretrained=folder)` and transformers' T5EncoderModel both load."""
        from safetensors.numpy import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "config.json", "w") as f:
            json.dump(self.config.to_hf_dict(), f, indent=2)
        spiece = out / "spiece.model"
        if not spiece.exists() or not spiece.samefile(self.tokenizer.path):
            shutil.copyfile(self.tokenizer.path, spiece)
        with open(out / "tokenizer_config.json", "w") as f:
            json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": self.tokenizer.extra_ids, "eos_token": "</s>",
                       "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": self.model_max_length,
                       "legacy": True}, f, indent=2)
        tensors = {}
        for name, p in self.model.parameters_and_names():
            tensors[name] = np.ascontiguousarray(to_numpy(p))
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
