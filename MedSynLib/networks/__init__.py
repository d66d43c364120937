"""The denoising networks: `unet` (MedSyn's 3D U-Net with text cross-attention and the
super-resolution condition) and `reference` (the reference implementation's layout, for its
released checkpoints)."""
