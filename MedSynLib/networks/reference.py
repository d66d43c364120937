"""The reference implementation's two UNets, rebuilt so its released checkpoints load as they are.

`ReferenceUNet3D` has exactly the parameter names, shapes and module order of the
reference's `Unet3D` classes (GitHub batmanlab/MedSyn, read, not copied):
- variant "low_res" (stage 1, `src/eval_low_res_given_prompt.py` / `train_low_res.py`):
  `init_conv`, `time_mlp`, `null_cond_emb` (1, 192, 768), `downs.i` = [in-plane res-block,
  in-plane res-block, 3D res-block, in-plane downsample], `mid_block1`, then
  `num_middle_blocks` x [`mid_spatial_attnK`, `mid_cross_attnK`, `mid_temporal_attnK`],
  `mid_block2`, `ups.i` (same 4 entries, transposed-conv upsample), `final_conv`.
  The four middle spatial attentions share ONE attention module (only their pre-norm gains
  differ), so `state_dict()` lists those weights once per block, as the reference does.
- variant "super_res" (stage 2, `src/eval_super_res.py`, `use_sparse_linear_attn=False`):
  `init_conv0` over [low-res condition, noisy volume] (condition FIRST), `downs.i` /
  `ups.i` = [res, res, Identity, Identity, 3D res, down/upsample], `mid_block1`,
  `mid_spatial_attn`, `mid_temporal_conv`, `mid_block2`, `final_conv0`; no text.

Blocks are post-norm (conv -> GroupNorm -> time scale/shift -> SiLU), attention pre-norms are
a channel LayerNorm with a gain only, the time embedding uses log(10000)/(half-1) frequencies.
Down = res, res, (skip), downsample, 3D res. The up levels come in two orders with the same
parameters (`up_order`): the evaluation scripts (`eval_*.py`, the default, what the released
code samples with) run concat skip, res, res, 3D res, upsample; the training scripts
(`train_*.py`) upsample right after the first res-block: concat skip, res, upsample, res, 3D res.
Attention runs through `torch.nn.functional.scaled_dot_product_attention` (the reference
uses xformers with the default 1/sqrt(head_dim) scale, which is the same function). As in
the reference, cross-attention attends to all text tokens: `text_mask` is accepted and ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from MedSynLib.compat import zip_strict

VARIANTS = ("low_res", "super_res")
UP_ORDERS = ("evaluation", "training")  # where each up level upsamples: last, or after its first block


@dataclass(frozen=True)
class ReferenceUNetConfig:
    """Constructor arguments of `ReferenceUNet3D`; defaults are the reference's stage-1 sizes."""

    variant: str = "low_res"
    channels: int = 4  # CT, lobe label, airway, vessel
    dim: int = 160
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    text_dim: Optional[int] = 768  # the reference's cond_dim; None for stage 2
    text_tokens: int = 192
    attn_heads: int = 8
    attn_head_dim: int = 32
    num_middle_blocks: int = 4  # stage 1 only; stage 2 has one middle attention
    init_kernel: int = 7
    norm_groups: int = 8
    time_scale: float = 1000.0  # the network sees t * time_scale, t in [0, 1]
    up_order: str = "evaluation"  # one of UP_ORDERS: the reference's eval_*.py or train_*.py up levels

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.up_order not in UP_ORDERS:
            raise ValueError(f"up_order must be one of {UP_ORDERS}, got {self.up_order!r}")
        if (self.variant == "low_res") != bool(self.text_dim):
            raise ValueError("the low_res variant needs text_dim; the super_res variant takes no text")
        if self.dim % 2 or self.dim % self.norm_groups:
            raise ValueError(f"dim {self.dim} must be even and divisible by norm_groups {self.norm_groups}")
        if not self.dim_mults:
            raise ValueError("dim_mults must name at least one level")
        if self.init_kernel % 2 == 0:
            raise ValueError("init_kernel must be odd")

    # The names the pipeline reads from any stage network config.
    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.channels

    @property
    def cond_channels(self) -> int:
        return self.channels if self.variant == "super_res" else 0

    @property
    def spatial_divisor(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)


def reference_stage1_config(**changes) -> ReferenceUNetConfig:
    """Stage 1 as released: dim 160, mults (1,2,4,8), 8 heads x 32, text 768 x 192 tokens."""
    return ReferenceUNetConfig(**{"variant": "low_res", **changes})


def reference_stage2_config(**changes) -> ReferenceUNetConfig:
    """Stage 2 as released: dim 56, mults (1,2,4,8), 4 heads x 32, no text."""
    defaults = {"variant": "super_res", "dim": 56, "text_dim": None, "attn_heads": 4, "num_middle_blocks": 1}
    return ReferenceUNetConfig(**{**defaults, **changes})


def reference_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The reference's sinusoidal embedding: frequencies exp(-i log(10000) / (half - 1)), [sin, cos]."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return reference_time_embedding(t, self.dim)


class ConvNormAct(nn.Module):
    """conv -> GroupNorm -> optional (1 + scale, shift) -> SiLU (the reference's `Block`/`Block3d`)."""

    def __init__(self, in_ch: int, out_ch: int, *, kernel: tuple[int, int, int], groups: int):
        super().__init__()
        self.proj = nn.Conv3d(in_ch, out_ch, kernel, padding=tuple(k // 2 for k in kernel))
        self.norm = nn.GroupNorm(groups, out_ch)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ReferenceResBlock(nn.Module):
    """`mlp` (SiLU, Linear) -> scale/shift of block1; block2; 1x1x1 `res_conv` when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, *, kernel: tuple[int, int, int], groups: int, time_dim: int | None):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch)) if time_dim else None
        self.block1 = ConvNormAct(in_ch, out_ch, kernel=kernel, groups=groups)
        self.block2 = ConvNormAct(out_ch, out_ch, kernel=kernel, groups=groups)
        self.res_conv = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None:
            scale_shift = self.mlp(time_emb)[:, :, None, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of (b, c, d, h, w) with a gain and no bias (eps 1e-5)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.gamma


class PreNorm(nn.Module):
    def __init__(self, channels: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(x, **kwargs) + x


class TokenAttention(nn.Module):
    """Multi-head self-attention on (..., tokens, channels); no biases (the reference's `Attention`)."""

    def __init__(self, channels: int, *, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(channels, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, channels, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p, "... n (h e) -> ... h n e", h=self.heads) for p in self.to_qkv(tokens).chunk(3, dim=-1))
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "... h n e -> ... n (h e)"))


class PerSliceTokens(nn.Module):
    """Runs `fn` on the pixels of each axial slice as tokens: (b, c, d, h, w) <-> (b, d, h*w, c)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[3:]
        out = self.fn(rearrange(x, "b c d h w -> b d (h w) c"))
        return rearrange(out, "b d (h w) c -> b c d h w", h=h, w=w)


class SliceTextCrossAttention(nn.Module):
    """Each slice's pixels attend to all text tokens (1x1 conv queries, linear keys/values)."""

    def __init__(self, channels: int, text_dim: int, *, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Conv2d(channels, inner, 1, bias=False)
        self.to_kv = nn.Linear(text_dim, 2 * inner, bias=False)
        self.to_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, *, text: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        q = self.to_q(rearrange(x, "b c d h w -> (b d) c h w"))
        q = rearrange(q, "(b d) (n e) h w -> b d n (h w) e", b=b, n=self.heads)
        k, v = (rearrange(p, "b t (n e) -> b 1 n t e", n=self.heads) for p in self.to_kv(text).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k.expand(-1, d, -1, -1, -1), v.expand(-1, d, -1, -1, -1))
        out = self.to_out(rearrange(out, "b d n (h w) e -> (b d) (n e) h w", h=h, w=w))
        return rearrange(out, "(b d) c h w -> b c d h w", b=b)


def _downsample(channels: int) -> nn.Module:
    return nn.Conv3d(channels, channels, (1, 4, 4), (1, 2, 2), (0, 1, 1))


def _upsample(channels: int) -> nn.Module:
    return nn.ConvTranspose3d(channels, channels, (1, 4, 4), (1, 2, 2), (0, 1, 1))


class ReferenceUNet3D(nn.Module):
    """The reference's stage-1 or stage-2 denoiser (see the module docstring); predicts x_0."""

    def __init__(self, config: ReferenceUNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # accepted for interface parity; not implemented here
        low_res = config.variant == "low_res"
        dim, groups, heads, head_dim = config.dim, config.norm_groups, config.attn_heads, config.attn_head_dim
        time_dim = 4 * dim
        res2d = {"kernel": (1, 3, 3), "groups": groups, "time_dim": time_dim}
        res3d = {"kernel": (3, 3, 3), "groups": groups, "time_dim": time_dim}
        # Level attention slots of stage 2 (use_sparse_linear_attn=False) are parameter-free Identities.
        empty_slots = 0 if low_res else 2

        in_ch = config.channels if low_res else 2 * config.channels
        k = config.init_kernel
        self.add_module("init_conv" if low_res else "init_conv0", nn.Conv3d(in_ch, dim, k, padding=k // 2))
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        if low_res:
            self.null_cond_emb = nn.Parameter(torch.randn(1, config.text_tokens, config.text_dim))

        widths = [dim] + [dim * m for m in config.dim_mults]
        pairs = list(zip_strict(widths[:-1], widths[1:]))
        last = len(pairs) - 1
        self.downs = nn.ModuleList(
            nn.ModuleList([
                ReferenceResBlock(i, o, **res2d), ReferenceResBlock(o, o, **res2d), *(nn.Identity() for _ in range(empty_slots)),
                ReferenceResBlock(o, o, **res3d), _downsample(o) if n < last else nn.Identity(),
            ])
            for n, (i, o) in enumerate(pairs)
        )
        self.ups = nn.ModuleList(
            nn.ModuleList([
                ReferenceResBlock(2 * o, i, **res2d), ReferenceResBlock(i, i, **res2d),
                *(nn.Identity() for _ in range(empty_slots)),
                ReferenceResBlock(i, i, **res3d), _upsample(i) if n < last else nn.Identity(),
            ])
            for n, (i, o) in enumerate(reversed(pairs))
        )

        mid = widths[-1]
        self.mid_block1 = ReferenceResBlock(mid, mid, **res2d)
        spatial_attn = PerSliceTokens(TokenAttention(mid, heads=heads, head_dim=head_dim))  # shared by all blocks
        if low_res:
            for n in range(1, config.num_middle_blocks + 1):
                self.add_module(f"mid_spatial_attn{n}", Residual(PreNorm(mid, spatial_attn)))
                cross = SliceTextCrossAttention(mid, config.text_dim, heads=heads, head_dim=head_dim)
                self.add_module(f"mid_cross_attn{n}", Residual(PreNorm(mid, cross)))
                self.add_module(f"mid_temporal_attn{n}", ReferenceResBlock(mid, mid, **res3d))
        else:
            self.mid_spatial_attn = Residual(PreNorm(mid, spatial_attn))
            self.mid_temporal_conv = ReferenceResBlock(mid, mid, **res3d)
        self.mid_block2 = ReferenceResBlock(mid, mid, **res2d)

        final = nn.Sequential(
            ReferenceResBlock(2 * dim, dim, kernel=(1, 3, 3), groups=groups, time_dim=None),
            nn.Conv3d(dim, config.channels, 1),
        )
        self.add_module("final_conv" if low_res else "final_conv0", final)

    def text_or_null(
        self, text: torch.Tensor | None, batch: int, drop_text: torch.Tensor | None
    ) -> torch.Tensor:
        null = self.null_cond_emb.expand(batch, -1, -1)
        if text is None:
            return null
        if text.shape[1:] != null.shape[1:]:
            raise ValueError(f"text features must have shape (batch, {null.shape[1]}, {null.shape[2]}), got {tuple(text.shape)}")
        text = text.to(null.dtype)
        if drop_text is None:
            return text
        return torch.where(drop_text.bool()[:, None, None], null, text)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,  # ignored: the reference attends to all tokens
        cond: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (b, channels, d, h, w); t: (b,) in [0, 1]; text: (b, tokens, text_dim); cond: like x."""
        config = self.config
        low_res = config.variant == "low_res"
        self._check_input(x, cond)
        if not low_res:
            x = torch.cat([cond.to(x.dtype), x], dim=1)  # the reference's cat([x_lr, x_t])
        time_emb = self.time_mlp(t * config.time_scale).to(x.dtype)
        if low_res:
            text = self.text_or_null(text, x.shape[0], drop_text)

        x = (self.init_conv if low_res else self.init_conv0)(x)
        init_features, skips = x, []
        for block1, block2, *_, block3d, downsample in self.downs:
            x = block2(block1(x, time_emb), time_emb)
            skips.append(x)
            x = block3d(downsample(x), time_emb)

        x = self.mid_block1(x, time_emb)
        if low_res:
            for n in range(1, config.num_middle_blocks + 1):
                x = getattr(self, f"mid_spatial_attn{n}")(x)
                x = getattr(self, f"mid_cross_attn{n}")(x, text=text)
                x = getattr(self, f"mid_temporal_attn{n}")(x, time_emb)
        else:
            x = self.mid_temporal_conv(self.mid_spatial_attn(x), time_emb)
        x = self.mid_block2(x, time_emb)

        upsample_first = config.up_order == "training"
        for block1, block2, *_, block3d, upsample in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), time_emb)
            if upsample_first:
                x = upsample(x)
            x = block3d(block2(x, time_emb), time_emb)
            if not upsample_first:
                x = upsample(x)
        x = torch.cat([x, init_features], dim=1)
        return (self.final_conv if low_res else self.final_conv0)(x)

    def _check_input(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        config = self.config
        if x.ndim != 5 or x.shape[1] != config.channels:
            raise ValueError(f"expected input (batch, {config.channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % config.spatial_divisor for s in x.shape[3:]):
            raise ValueError(f"height and width {tuple(x.shape[3:])} must be divisible by {config.spatial_divisor}")
        if (cond is not None) != (config.variant == "super_res"):
            raise ValueError(f"the {config.variant} network {'needs' if cond is None else 'takes no'} a conditioning volume")
        if cond is not None and cond.shape != x.shape:
            raise ValueError(f"cond must have the shape of x {tuple(x.shape)}, got {tuple(cond.shape)}")


def count_parameters(config: ReferenceUNetConfig) -> int:
    """Distinct parameters (shared weights counted once), built on the meta device: no memory used."""
    with torch.device("meta"):
        network = ReferenceUNet3D(config)
    return sum(p.numel() for p in network.parameters())
