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


def build_loader(cfg, dataset, ctx, out=None):
    """This rank's loader of `dataset`: fixed-size batches of data.batch_size (opensora.data.loader.BatchLoader),
    or, with data.bucket_config, each step's bucket micro-batches (opensora.data.bucket_loader; plan records in
    `<out>/data`)."""
    data = cfg.data
    if data.get("bucket_config") is not None:
        from opensora.data.bucket_loader import build_bucket_loader

        return build_bucket_loader(cfg, dataset, ctx, out)
    from opensora.data.loader import BatchLoader

    return BatchLoader(dataset, int(data.batch_size), seed=int(cfg.seed), rank=ctx.data_rank, world_size=ctx.data_size,
                       num_workers=int(data.get("num_workers", 0)), prefetch=int(data.get("prefetch", 2)),
                       max_bad_fraction=data.get("max_bad_fraction", 0.1))


__all__ = ["COLORS", "DIRECTIONS", "SHAPES", "SyntheticVideoDataset", "build_dataset", "build_loader", "caption", "parse_caption",
           "render_clip", "split_prompts"]
