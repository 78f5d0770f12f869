"""VAEs map videos [B, 3, T, H, W] in [-1, 1] to latents [B, C, T', H', W'] and back."""
from opensora.vae.identity import IdentityVAE

__all__ = ["IdentityVAE"]
