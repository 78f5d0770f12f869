"""VAEs map videos [B, 3, T, H, W] in [-1, 1] to latents [B, C, T', H', W'] and back."""
from opensora.vae.identity import IdentityVAE
from opensora.vae.sd_vae import VideoAutoencoderKL

__all__ = ["IdentityVAE", "VideoAutoencoderKL"]
