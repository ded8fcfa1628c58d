"""wldm_auto: self-configuring MR-to-CT synthesis with a 3D wavelet latent diffusion model."""

__version__ = "0.1.0"
