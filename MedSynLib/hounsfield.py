"""Hounsfield-unit ranges and windows that data, model, evaluation and Slicer share."""

# What the networks see: HU clipped to this range and mapped linearly to [-1, 1], as in the
# reference (and HA-GAN's evaluation protocol, which the reference's FID follows).
MODEL_HU_RANGE = (-1024.0, 600.0)
# What case files and phantoms store (int16): the 12-bit CT range.
STORED_HU_RANGE = (-1024, 3071)
# Slicer's "CT-Lung" window/level preset; previews use it too, so they look as Slicer shows results.
LUNG_WINDOW, LUNG_LEVEL = 1400.0, -500.0
