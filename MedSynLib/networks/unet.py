"""The denoising networks: a pseudo-3D UNet for both MedSyn stages.

Stage 1 (text -> 64^3 CT + anatomy) and stage 2 (64^3 -> 256^3 super-resolution) share
one UNet family, as in the reference implementation: each level has two in-plane
(1,3,3) residual blocks, an in-plane downsampling that keeps the slice count, and one
full 3x3x3 residual block; the middle holds per-slice self-attention, per-slice
cross-attention to the report tokens and a 3D residual block. Stage 1 adds text
cross-attention and a learned null text for classifier-free guidance; stage 2 takes the
upsampled low-resolution volume as extra input channels.

Optionally (`pooled_text`, not in the reference) the mean of the report tokens is added to
the time embedding, as Imagen does: whole-report facts (is there an effusion, on which
side) then reach every residual block instead of only the lowest-resolution
cross-attention, which a small network trained briefly learns much sooner. Its last
layer starts at zero, so adding it to a trained network changes nothing until fine-tuned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from MedSynLib.compat import zip_strict
from MedSynLib.configuration import check_settings

DOWNSAMPLING = ("inplane", "isotropic")
# (low, high) of every size in UNet3DConfig: a negative or huge value fails as a config error, not in torch.
NETWORK_LIMITS: dict[str, tuple[float, float]] = {
    "in_channels": (1, 1024), "out_channels": (1, 1024), "dim": (1, 4096), "dim_mults": (1, 64),
    "cond_channels": (0, 1024), "text_dim": (1, 16384), "text_tokens": (1, 8192), "attn_heads": (1, 256),
    "attn_head_dim": (1, 1024), "num_middle_blocks": (0, 64), "init_kernel": (1, 15), "norm_groups": (1, 4096),
    "time_scale": (1e-6, 1e6),
}


@dataclass(frozen=True)
class UNet3DConfig:
    """Constructor arguments of `UNet3D`, stored as the stage's `config.json`."""

    in_channels: int
    out_channels: int
    dim: int = 32
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    cond_channels: int = 0  # stage 2: channels of the upsampled low-res volume
    text_dim: Optional[int] = None  # stage 1: hidden size of the report encoder
    text_tokens: int = 192  # length of the learned null text
    attn_heads: int = 8
    attn_head_dim: int = 32
    num_middle_blocks: int = 4
    downsampling: str = "inplane"
    init_kernel: int = 7
    norm_groups: int = 8
    time_scale: float = 1000.0  # the network sees t * time_scale, t in [0, 1]
    pooled_text: bool = False  # stage 1: also add the mean report token to the time embedding
    # stage 2: the output is the condition plus a learned correction (x0 prediction only). The
    # correction starts at zero, so an untrained network already gives the upsampled volume at its
    # densities, and training only has to learn the detail the low resolution lacks.
    residual: bool = False

    def __post_init__(self) -> None:
        check_settings(self, NETWORK_LIMITS)
        if self.downsampling not in DOWNSAMPLING:
            raise ValueError(f"downsampling must be one of {DOWNSAMPLING}, got {self.downsampling!r}")
        if self.dim % self.norm_groups:
            raise ValueError(f"dim {self.dim} must be divisible by norm_groups {self.norm_groups}")
        if not 1 <= len(self.dim_mults) <= 8:
            raise ValueError(f"dim_mults must name 1 to 8 levels, got {self.dim_mults}")
        if self.init_kernel % 2 == 0:
            raise ValueError("init_kernel must be odd")
        if self.pooled_text and not self.text_dim:
            raise ValueError("pooled_text needs text_dim (a text-conditioned stage-1 network)")
        if self.residual and self.cond_channels != self.out_channels:
            raise ValueError("residual needs a condition of out_channels channels (a stage-2 network)")

    @property
    def spatial_divisor(self) -> int:
        """Height and width (and depth for isotropic downsampling) must be multiples of this."""
        return 2 ** (len(self.dim_mults) - 1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (scaled) diffusion times, shape (batch, dim)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class ResBlock(nn.Module):
    """Pre-norm residual block; the time embedding scales and shifts the second norm."""

    def __init__(self, in_ch: int, out_ch: int, *, time_dim: int, kernel: tuple[int, int, int], groups: int):
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, padding=padding)
        self.time = nn.Linear(time_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel, padding=padding)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(F.silu(time_emb))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SliceSelfAttention(nn.Module):
    """Self-attention among the pixels of each axial slice (tokens = H*W, batched over slices)."""

    def __init__(self, channels: int, *, heads: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.to_qkv = nn.Linear(channels, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c d h w -> (b d) (h w) c")
        q, k, v = rearrange(self.to_qkv(tokens), "n l (three h e) -> three n h l e", three=3, h=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "n h l e -> n l (h e)")
        return x + rearrange(self.to_out(out), "(b d) (h w) c -> b c d h w", b=b, d=d, h=h, w=w)


class SliceCrossAttention(nn.Module):
    """Each slice's pixels attend to the report tokens (keys and values from the text)."""

    def __init__(self, channels: int, text_dim: int, *, heads: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_kv = nn.Linear(text_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        q = rearrange(self.to_q(rearrange(self.norm(x), "b c d h w -> b d (h w) c")), "b d l (h e) -> b d h l e", h=self.heads)
        k, v = rearrange(self.to_kv(text), "b n (two h e) -> two b 1 h n e", two=2, h=self.heads)
        mask = text_mask[:, None, None, None, :]  # (b, 1, 1, 1, n): broadcast over slices, heads, queries
        out = F.scaled_dot_product_attention(q, k.expand(-1, d, -1, -1, -1), v.expand(-1, d, -1, -1, -1), attn_mask=mask)
        return x + rearrange(self.to_out(rearrange(out, "b d h l e -> b d l (h e)")), "b d (h w) c -> b c d h w", h=h, w=w)


class MiddleBlock(nn.Module):
    def __init__(self, channels: int, config: UNet3DConfig, time_dim: int):
        super().__init__()
        heads, head_dim, groups = config.attn_heads, config.attn_head_dim, config.norm_groups
        self.self_attn = SliceSelfAttention(channels, heads=heads, head_dim=head_dim, groups=groups)
        self.cross_attn = (
            SliceCrossAttention(channels, config.text_dim, heads=heads, head_dim=head_dim, groups=groups)
            if config.text_dim
            else None
        )
        self.res = ResBlock(channels, channels, time_dim=time_dim, kernel=(3, 3, 3), groups=groups)

    def forward(self, x, time_emb, text, text_mask):
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, text, text_mask)
        return self.res(x, time_emb)


def _resample_geometry(downsampling: str) -> dict:
    if downsampling == "inplane":
        return {"kernel_size": (1, 4, 4), "stride": (1, 2, 2), "padding": (0, 1, 1)}
    return {"kernel_size": 4, "stride": 2, "padding": 1}


class Level(nn.Module):
    """One UNet level: two in-plane res-blocks, optional down/upsampling, one 3D res-block."""

    def __init__(self, in_ch: int, out_ch: int, *, config: UNet3DConfig, time_dim: int, resample: nn.Module):
        super().__init__()
        groups = config.norm_groups
        self.res1 = ResBlock(in_ch, out_ch, time_dim=time_dim, kernel=(1, 3, 3), groups=groups)
        self.res2 = ResBlock(out_ch, out_ch, time_dim=time_dim, kernel=(1, 3, 3), groups=groups)
        self.resample = resample
        self.res3 = ResBlock(out_ch, out_ch, time_dim=time_dim, kernel=(3, 3, 3), groups=groups)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, features before resampling) -- the latter is the down path's skip."""
        x = self.res2(self.res1(x, time_emb), time_emb)
        skip = x
        return self.res3(self.resample(x), time_emb), skip


class UNet3D(nn.Module):
    """Denoiser f(x_t, t, text, cond) for either stage; see the module docstring."""

    def __init__(self, config: UNet3DConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        dim, groups = config.dim, config.norm_groups
        time_dim = 4 * dim
        self.time_mlp = nn.Sequential(nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        self.init_conv = nn.Conv3d(
            config.in_channels + config.cond_channels, dim, config.init_kernel, padding=config.init_kernel // 2
        )
        if config.text_dim:
            self.null_text = nn.Parameter(torch.randn(1, config.text_tokens, config.text_dim) * 0.02)
        if config.pooled_text:
            self.text_to_time = nn.Sequential(
                nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            )
            nn.init.zeros_(self.text_to_time[-1].weight)
            nn.init.zeros_(self.text_to_time[-1].bias)

        widths = [dim * m for m in config.dim_mults]
        pairs = list(zip_strict([dim] + widths[:-1], widths))
        geometry = _resample_geometry(config.downsampling)
        self.down = nn.ModuleList(
            Level(
                i, o, config=config, time_dim=time_dim,
                resample=nn.Conv3d(o, o, **geometry) if n < len(pairs) - 1 else nn.Identity(),
            )
            for n, (i, o) in enumerate(pairs)
        )
        self.middle = nn.ModuleList(MiddleBlock(widths[-1], config, time_dim) for _ in range(config.num_middle_blocks))
        self.up = nn.ModuleList(
            Level(
                2 * o, i, config=config, time_dim=time_dim,
                resample=nn.ConvTranspose3d(i, i, **geometry) if n < len(pairs) - 1 else nn.Identity(),
            )
            for n, (i, o) in enumerate(reversed(pairs))
        )
        self.final_res = ResBlock(2 * dim, dim, time_dim=time_dim, kernel=(3, 3, 3), groups=groups)
        self.final_conv = nn.Conv3d(dim, config.out_channels, 1)
        if config.residual:
            nn.init.zeros_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def text_or_null(
        self, text: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, drop_text: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The report tokens, with the learned null text where `drop_text` is set (or no text given)."""
        null = self.null_text.expand(batch, -1, -1)
        null_mask = torch.ones(null.shape[:2], dtype=torch.bool, device=null.device)
        if text is None:
            return null, null_mask
        if text.shape[1:] != null.shape[1:]:
            raise ValueError(f"text features must have shape (batch, {null.shape[1]}, {null.shape[2]}), got {tuple(text.shape)}")
        text_mask = torch.ones_like(null_mask) if text_mask is None else text_mask.bool()
        if drop_text is None:
            return text.to(null.dtype), text_mask
        drop = drop_text.bool()
        return torch.where(drop[:, None, None], null, text.to(null.dtype)), torch.where(drop[:, None], null_mask, text_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (b, in_channels, d, h, w); t: (b,) in [0, 1]; text: (b, tokens, text_dim); cond: (b, cond_channels, d, h, w)."""
        self._check_input(x, cond)
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        time_emb = self.time_mlp(timestep_embedding(t * self.config.time_scale, self.config.dim).to(x.dtype))
        if self.config.text_dim:
            text, text_mask = self.text_or_null(text, text_mask, x.shape[0], drop_text)
        if self.config.pooled_text:
            weights = text_mask.to(text.dtype)[:, :, None]
            pooled = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
            time_emb = time_emb + self.text_to_time(pooled).to(time_emb.dtype)

        x = self.init_conv(x)
        init_features, skips = x, []
        for level in self.down:
            x, skip = self._run(level, x, time_emb)
            skips.append(skip)
        for block in self.middle:
            x = self._run(block, x, time_emb, text, text_mask)
        for level in self.up:
            x, _ = self._run(level, torch.cat([x, skips.pop()], dim=1), time_emb)
        x = self.final_res(torch.cat([x, init_features], dim=1), time_emb)
        out = self.final_conv(x)
        return out + cond.to(out.dtype) if self.config.residual else out

    def _check_input(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        config = self.config
        if x.ndim != 5 or x.shape[1] != config.in_channels:
            raise ValueError(f"expected input (batch, {config.in_channels}, D, H, W), got {tuple(x.shape)}")
        divisor = config.spatial_divisor
        sizes = x.shape[2:] if config.downsampling == "isotropic" else x.shape[3:]
        if any(s % divisor for s in sizes):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {divisor} ({config.downsampling})")
        expected_cond = config.cond_channels > 0
        if (cond is not None) != expected_cond:
            raise ValueError(f"this network {'needs' if expected_cond else 'takes no'} a conditioning volume")
        if cond is not None and (cond.shape[1] != config.cond_channels or cond.shape[2:] != x.shape[2:]):
            raise ValueError(f"cond must be (batch, {config.cond_channels}, {tuple(x.shape[2:])}), got {tuple(cond.shape)}")
