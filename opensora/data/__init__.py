"""Datasets: the built-in synthetic shapes data (`opensora.data.synthetic`), video-caption CSVs with
optional cached embeddings (`opensora.data.video`, `opensora.data.cache`) and the batch loader."""
from opensora.data.synthetic import (COLORS, DIRECTIONS, SHAPES, SyntheticVideoDataset, caption, parse_caption,
                                     render_clip, split_prompts)


def build_dataset(cfg):
    """`cfg.data.dataset` instantiated; with data.text_embed_folder / data.video_embed_folder it is given the
    settings those caches must have been built with (from cfg.text_encoder / cfg.data and cfg.vae)."""
    from hydra.utils import instantiate

    from opensora.data.cache import text_cache_settings, video_cache_settings

    extra = {}
    if cfg.data.get("text_embed_folder"):
        extra["text_cache_settings"] = text_cache_settings(cfg.text_encoder)
    if cfg.data.get("video_embed_folder"):
        extra["video_cache_settings"] = video_cache_settings(cfg.data, cfg.vae)
    return instantiate(cfg.data.dataset, **extra)


__all__ = ["COLORS", "DIRECTIONS", "SHAPES", "SyntheticVideoDataset", "build_dataset", "caption", "parse_caption",
           "render_clip", "split_prompts"]
