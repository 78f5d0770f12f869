"""Evaluators that score sampled videos against their prompts."""
from opensora.eval.shapes import detect_color, detect_direction, evaluate_samples

__all__ = ["detect_color", "detect_direction", "evaluate_samples"]
