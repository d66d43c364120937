"""Render the classical segmentation of the real test scan: axial, coronal, sagittal."""

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from MedSynLib.anatomy import STRUCTURES
from MedSynLib.data.segmentation import segment_classical
from MedSynLib.io.dicom import read_dicom_series
from MedSynLib.io.sample_ct import real_chest_ct_dir

image = read_dicom_series(real_chest_ct_dir())
result = segment_classical(image)
hu = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x), LPS, z up
m = result.masks
dx, dy, dz = image.GetSpacing()
order = [("left_lung", 0.40), ("right_lung", 0.40), ("vessels", 0.85), ("airway", 0.85)]


def overlay(ct2d, masks2d):
    gray = np.clip((ct2d + 1000.0) / 1400.0, 0, 1) * 255
    rgb = np.stack([gray] * 3, -1)
    for name, alpha in order:
        color = np.array(STRUCTURES[name].color) * 255
        sel = masks2d[name]
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * color
    body_edge = masks2d["body"] & ~ndimage.binary_erosion(masks2d["body"], border_value=1)
    rgb[body_edge] = [255, 200, 0]
    return Image.fromarray(rgb.astype(np.uint8))


# Axial: the highest slice where the airway shows both main bronchi (>= 50 mm^2 each).
def _second_piece(z):
    labels, n = ndimage.label(m["airway"][z])
    return sorted(np.bincount(labels.ravel())[1:])[-2] if n >= 2 else 0


z_axial = max(z for z in range(hu.shape[0]) if _second_piece(z) * dx * dy >= 50.0)
# Coronal through the trachea's centre; sagittal through the right lung's centre.
_, y_cor, _ = (int(round(c)) for c in ndimage.center_of_mass(m["airway"]))
_, _, x_sag = (int(round(c)) for c in ndimage.center_of_mass(m["right_lung"]))


def pick(idx):
    return {k: v[idx] for k, v in m.items()}


ax = overlay(hu[z_axial], pick(np.s_[z_axial]))
cor = overlay(hu[::-1, y_cor, :], {k: v[::-1, y_cor, :] for k, v in m.items()})
sag = overlay(hu[::-1, :, x_sag], {k: v[::-1, :, x_sag] for k, v in m.items()})
h = 420


def fit(img, sx, sy):  # physical aspect
    w_mm, h_mm = img.width * sx, img.height * sy
    return img.resize((int(round(h * w_mm / h_mm)), h), Image.BILINEAR)


tiles = [fit(ax, dx, dy), fit(cor, dx, dz), fit(sag, dy, dz)]
labels = [f"axial, slice {z_axial}", f"coronal, row {y_cor}", f"sagittal, column {x_sag}"]
W = sum(t.width for t in tiles) + 10 * (len(tiles) + 1)
font = ImageFont.load_default(size=15)
small = ImageFont.load_default(size=13)
canvas = Image.new("RGB", (W, h + 95), "black")
draw = ImageDraw.Draw(canvas)
x = 10
for t, lab in zip(tiles, labels, strict=False):
    canvas.paste(t, (x, 30))
    draw.text((x, 8), lab, fill="white", font=font)
    x += t.width + 10
legend_x = 10
for name, _ in order:
    c = tuple(int(255 * v) for v in STRUCTURES[name].color)
    draw.rectangle([legend_x, h + 42, legend_x + 14, h + 56], fill=c)
    draw.text((legend_x + 20, h + 41), name.replace("_", " "), fill="white", font=font)
    legend_x += 150
draw.rectangle([legend_x, h + 42, legend_x + 14, h + 56], fill=(255, 200, 0))
draw.text((legend_x + 20, h + 41), "body outline", fill="white", font=font)
draw.text(
    (10, h + 68),
    "MedSyn classical segmenter (no weights). CT: TCIA Lung-PET-CT-Dx, patient Lung_Dx-A0001, CC BY 4.0; "
    "Li P et al., TCIA 2020, doi:10.7937/TCIA.2020.NNC2-0461",
    fill=(200, 200, 200),
    font=small,
)
canvas.save("docs/images/classical_segmentation.png", optimize=True)
print(canvas.size, z_axial, y_cor, x_sag)
