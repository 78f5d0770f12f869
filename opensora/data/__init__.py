"""Datasets: the built-in synthetic shapes data (`opensora.data.synthetic`)."""
from opensora.data.synthetic import (COLORS, DIRECTIONS, SHAPES, SyntheticVideoDataset, caption, parse_caption,
                                     render_clip, split_prompts)

__all__ = ["COLORS", "DIRECTIONS", "SHAPES", "SyntheticVideoDataset", "caption", "parse_caption", "render_clip",
           "split_prompts"]
