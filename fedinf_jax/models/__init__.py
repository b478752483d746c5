"""Score-network architectures."""

from fedinf_jax.models.unet import UNet, make_unet

__all__ = ["UNet", "make_unet"]
