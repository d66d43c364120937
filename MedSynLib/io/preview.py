"""Preview pictures of a CT with its anatomy: three orthogonal slices, lung window.

Kept apart from file I/O so training nodes can render previews without SimpleITK.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from MedSynLib.anatomy import STRUCTURES
from MedSynLib.hounsfield import LUNG_LEVEL, LUNG_WINDOW


def preview_image(ct_hu: np.ndarray, masks: dict[str, np.ndarray], *, panel: int = 256) -> Image.Image:
    """Axial, coronal and sagittal centre slices side by side, lung window, anatomy overlaid."""
    low, high = LUNG_LEVEL - LUNG_WINDOW / 2, LUNG_LEVEL + LUNG_WINDOW / 2
    gray = np.clip((ct_hu.astype(np.float32) - low) / (high - low), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for name, mask in masks.items():  # later structures (airway, vessels) are drawn over the lungs
        color = np.array(STRUCTURES[name].color, dtype=np.float32)
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * color
    z, y, x = (n // 2 for n in ct_hu.shape)
    views = (rgb[z], rgb[::-1, y], rgb[::-1, :, x])  # superior up in coronal and sagittal views
    panels = [Image.fromarray((v * 255).astype(np.uint8)).resize((panel, panel), Image.BILINEAR) for v in views]
    canvas = Image.new("RGB", (3 * panel, panel))
    for i, image in enumerate(panels):
        canvas.paste(image, (i * panel, 0))
    return canvas
