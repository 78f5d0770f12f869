"""Open-Sora on MindSpore: STDiT text-to-video diffusion as a Hydra-configured framework."""

__version__ = "0.1.0"
