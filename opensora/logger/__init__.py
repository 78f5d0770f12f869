"""Experiment tracking."""
from opensora.logger.wandb import NullLogger, WandbLogger, build_logger

__all__ = ["WandbLogger", "NullLogger", "build_logger"]
