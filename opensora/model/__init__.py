"""Diffusion backbones."""

from .stdit import STDiT, count_parameters, stdit_xl2
from .stdit2 import STDiT2, stdit2_xl2

__all__ = ["STDiT", "stdit_xl2", "STDiT2", "stdit2_xl2", "count_parameters"]
