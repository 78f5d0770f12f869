"""On-disk caches of text embeddings and video latents (the seed's layout, plus a settings record).

    <folder>/cache_meta.json     # {"kind": "text"|"video", "settings": {...}}: how the cache was built
    <folder>/index.csv           # one row per entry: caption, path (relative to <folder>) [, video]
    <folder>/<name>.npz          # text: text_emb [L, D] float32, mask [L] int32
                                 # video: latent [C, T, H, W] float32 (+ optional extra arrays)

Entries built from a video CSV mirror the video folder's layout (``clips/vid001.mp4`` ->
``clips/vid001.npz``); entries built from prompts are numbered (``000000.npz``). A cache is only
used with the settings it was built with: `check_meta` compares them and refuses a mismatch,
naming each differing setting.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pandas as pd

from opensora.utils.tensor_files import atomic_savez, atomic_write, atomic_write_text

META = "cache_meta.json"
INDEX = "index.csv"


def save_text_embedding(path: str | os.PathLike, text_emb: np.ndarray, mask: np.ndarray) -> None:
    """One caption's embedding: text_emb [L, D] float32 and mask [L] int32 (1 = token, 0 = padding)."""
    text_emb, mask = np.asarray(text_emb), np.asarray(mask)
    if text_emb.ndim != 2 or mask.shape != text_emb.shape[:1]:
        raise ValueError(f"text embedding for {path}: expected text_emb [L, D] and mask [L], "
                         f"got {text_emb.shape} and {mask.shape}")
    atomic_savez(Path(path), text_emb=text_emb.astype(np.float32), mask=mask.astype(np.int32))


def load_text_embedding(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(text_emb [L, D] float32, mask [L] int32) from a cached .npz."""
    with np.load(path) as f:
        missing = [k for k in ("text_emb", "mask") if k not in f.files]
        if missing:
            raise KeyError(f"{path} has no {missing} array(s) (has {f.files}); not a text-embedding cache file")
        return f["text_emb"].astype(np.float32), f["mask"].astype(np.int32)


def save_video_latent(path: str | os.PathLike, latent: np.ndarray, **extra: np.ndarray) -> None:
    """One video's latent [C, T, H, W] float32 (plus any extra arrays, e.g. the frame indices used)."""
    latent = np.asarray(latent)
    if latent.ndim != 4:
        raise ValueError(f"video latent for {path}: expected [C, T, H, W], got shape {latent.shape}")
    atomic_savez(Path(path), latent=latent.astype(np.float32), **extra)


def load_video_latent(path: str | os.PathLike) -> np.ndarray:
    with np.load(path) as f:
        if "latent" not in f.files:
            raise KeyError(f"{path} has no 'latent' array (has {f.files}); not a video-latent cache file")
        return f["latent"].astype(np.float32)


def write_meta(folder: str | os.PathLike, kind: str, settings: Mapping) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / META, json.dumps({"kind": kind, "settings": dict(settings)}, indent=1, sort_keys=True,
                                                default=str))


def read_meta(folder: str | os.PathLike) -> Optional[dict]:
    path = Path(folder) / META
    return json.loads(path.read_text()) if path.is_file() else None


def check_meta(folder: str | os.PathLike, kind: str, expected: Mapping, config_key: str) -> None:
    """Refuse a cache built for another kind or with other settings; `config_key` names the option
    that points at the cache (e.g. ``data.text_embed_folder``) so the message says what to change."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{config_key}={folder} does not exist: build it first (task=embed_{kind})")
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{config_key}={folder} has no {META}: it was not written by task=embed_{kind}; "
                                "rebuild it")
    if meta.get("kind") != kind:
        raise ValueError(f"{config_key}={folder} is a {meta.get('kind')!r} cache, expected a {kind!r} cache")
    saved = meta.get("settings", {})
    expected = {k: _plain(v) for k, v in expected.items()}  # config nodes (hydra.utils.instantiate) as plain values
    # a fingerprint of files that do not exist yet (a tokenizer the run will train) cannot be compared
    expected = {k: v for k, v in expected.items() if not (k.endswith("_fingerprint") and v is None)}
    diffs = [f"{k}: cache {saved.get(k)!r} vs config {v!r}" + (
                 " (the weights or tokenizer differ from those the cache was built with)"
                 if k.endswith("_fingerprint") else "")
             for k, v in expected.items()
             if json.loads(json.dumps(saved.get(k), default=str)) != json.loads(json.dumps(v, default=str))]
    if diffs:
        raise ValueError(f"{config_key}={folder} was built with different settings ({'; '.join(diffs)}); "
                         f"rebuild it with task=embed_{kind} or change the config to match")


def write_index(folder: str | os.PathLike, rows: pd.DataFrame) -> None:
    """`rows` has at least `caption` and `path` (relative to `folder`) columns."""
    missing = {"caption", "path"} - set(rows.columns)
    if missing:
        raise ValueError(f"cache index needs columns caption, path; missing {sorted(missing)}")
    atomic_write(Path(folder) / INDEX, lambda tmp: rows.to_csv(tmp, index=False))


def read_index(folder: str | os.PathLike) -> pd.DataFrame:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the cache folder was not written by an embed task")
    return pd.read_csv(path, keep_default_na=False)


# ================================================================
# The settings a cache is built with (compared by check_meta when the cache is used)
# ================================================================


def _plain(node):
    """A config node (DictConfig / ListConfig / plain) as plain Python."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return node


def _name(path) -> Optional[str]:
    """A model folder or file by its name (e.g. `t5-v1_1-xxl`), for the record."""
    return None if path is None else Path(str(path)).name


# Files of a model folder that make up the model: weights, their index, the tokenizer, the config.
FINGERPRINTED = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".model", ".json")
_SAMPLE, _CHUNKS = 1 << 16, 16  # a large file is sampled: its start, end and 16 evenly spaced 64 KiB pieces


def content_fingerprint(*paths) -> Optional[str]:
    """A short hash of what `paths` (files, or folders: their model files) hold, so a cache is tied to the very
    weights and tokenizer it was built with, not to a folder's name. Files up to 4 MiB are hashed whole; larger
    ones (weights) by their size and sampled bytes, which costs milliseconds even for T5-XXL. None when a path
    does not exist (nothing to compare yet, e.g. a tokenizer a run has not trained)."""
    import hashlib

    files = []
    for path in paths:
        if path is None:
            continue
        p = Path(str(path))
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix in FINGERPRINTED)
        elif p.is_file():
            files.append(p)
        else:
            return None
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= 4 << 20:
                h.update(fh.read())
                continue
            for k in range(_CHUNKS + 2):
                fh.seek(0 if k == 0 else size - _SAMPLE if k == 1 else (size - _SAMPLE) * (k - 1) // (_CHUNKS + 1))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def text_cache_settings(text_encoder) -> dict:
    """What makes text embeddings interchangeable, from the `text_encoder` config: the encoder (the content
    fingerprint of its folder's weights, tokenizer and config - for a random-init encoder the folder it saved
    itself to beside its tokenizer), model_max_length, output_dim and clean_caption."""
    te = _plain(text_encoder)
    if te.get("from_pretrained"):
        ident = _name(te["from_pretrained"])
        fingerprint = content_fingerprint(te["from_pretrained"], te.get("tokenizer_path"))
    else:  # a random-init encoder saves itself beside its tokenizer: the same folder t5_folder would load
        ident = {"target": te.get("_target_"), "config": te.get("config"), "seed": te.get("seed")}
        tok = te.get("tokenizer_path")
        saved = Path(str(tok)).parent if tok and (Path(str(tok)).parent / "config.json").is_file() else None
        fingerprint = content_fingerprint(saved) if saved else content_fingerprint(tok)
    return {"text_encoder": ident, "text_encoder_fingerprint": fingerprint,
            "model_max_length": int(te["model_max_length"]),
            "output_dim": None if te.get("output_dim") is None else int(te["output_dim"]),
            "clean_caption": bool(te.get("clean_caption", False))}


def video_cache_settings(data, vae) -> dict:
    """What makes video latents interchangeable, from the `data` and `vae` configs: frames, frame
    interval, image size ([H, W]), the VAE (target, and the content fingerprint of its weights and config), its
    scale factor and whether it samples the posterior."""
    from opensora.data.aspect import as_size

    data, vae = _plain(data), _plain(vae)
    weights = vae.get("from_pretrained")
    config = Path(str(weights)).parent / "config.json" if weights and Path(str(weights)).is_file() else None
    common = {"vae": {"target": vae.get("_target_"), "weights": _name(weights)},
              "vae_fingerprint": content_fingerprint(weights, config) if weights else None,
              "scale_factor": vae.get("scale_factor"), "sample_posterior": bool(vae.get("sample_posterior", False))}
    if data.get("bucket_config") is not None:  # bucketed data: the latents of every bucket size (bucket_cache.py)
        buckets = {str(r): {str(t): v for t, v in ts.items()} for r, ts in data["bucket_config"].items()}
        return {"bucket_config": buckets, "resolutions": data.get("resolutions"),
                "frame_interval": int(data.get("frame_interval", 1)), **common}
    return {"num_frames": int(data["num_frames"]), "frame_interval": int(data.get("frame_interval", 1)),
            "image_size": list(as_size(data["image_size"])), **common}
