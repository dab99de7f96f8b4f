"""The VQ family of image tokenizers: VQGAN (Esser et al. 2021) with a choice of quantizer.

    images [B,3,H,W] in [0,1] -> [-1,1] -> encoder -> quant_conv -> quantize -> codes [B,h,w]
    codes -> quantize.embed -> post_quant_conv -> decoder -> [-1,1] -> images [0,1]

Module and parameter names follow taming-transformers' `VQModel` / `GumbelVQ` (`encoder.*`,
`decoder.*`, `quant_conv`, `post_quant_conv`, `quantize.embedding.weight` or, for Gumbel,
`quantize.proj` + `quantize.embed.weight`), so their released checkpoints load after
`dalle-ar convert taming-vqgan` (dalle_ar/convert.py) and `ch`, `ch_mult`, `num_res_blocks`,
`attn_resolutions`, `z_channels`, `embed_dim`, `n_embed` mean what they mean in taming's YAML.
Two generalisations for small models: `norm_groups` (taming fixes 32) and `num_res_blocks` as
one int per level.

Quantizers (`quantizer`, dalle_ar/quantizers.py): "vq" (taming's VectorQuantizer2, with optional
EMA codebook, dead-code restarts and l2-normalised codes), "gumbel" (taming's GumbelQuantize) and
"fsq" (finite scalar quantization: no codebook).

Training loss (forward): L1 or L2 reconstruction, optionally weighted up on edges of the target
(`edge_weight`: flat-colour images put all their detail there), + the quantizer's loss
(commitment / codebook / KL). The adversarial and perceptual terms, and the discriminator, belong
to training and live outside this module (the VQGAN loss module), so the tokenizer's state dict is
only the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .checks import check_images, check_tokens
from .dvae import cosine_ramp, psnr
from .image_tokenizer import ImageTokenizerMixin
from .quantizers import GumbelQuantizer, VectorQuantizer, build_quantizer

QUANTIZERS = ("vq", "gumbel", "fsq")
RECON_LOSSES = ("l1", "l2")


@dataclass
class VQGANConfig:
    kind: str = "vqgan"             # written into config.json: how load_image_tokenizer knows the class
    image_size: int = 64            # square images; a multiple of 2 ** (len(ch_mult) - 1)
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32
    ch_mult: tuple = (1, 2, 2, 4)   # one level per entry; a 2x down/upsample between levels
    num_res_blocks: Union[int, tuple] = 1  # per level (the decoder has one more per level), as in taming
    attn_resolutions: tuple = ()    # feature-map sizes that get self-attention (mid blocks always do)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    z_channels: int = 64
    embed_dim: int = 64             # dimension of a code vector (fsq: len(fsq_levels))
    n_embed: int = 1024             # vocabulary (fsq: the product of fsq_levels)
    norm_groups: int = 32           # GroupNorm groups (taming: 32)
    quantizer: str = "vq"
    # vq
    beta: float = 0.25              # commitment weight
    codebook_ema: Optional[float] = None   # EMA decay of the codebook (None: learned by gradient)
    dead_code_threshold: float = 0.0       # restart codes whose EMA usage (per batch) falls below this
    l2_norm_codes: bool = False
    # gumbel
    gumbel_kl_weight: float = 5e-4
    temp_start: float = 1.0
    temp_end: float = 1 / 16
    temp_anneal_steps: int = 5000
    gumbel_straight_through: bool = True
    # fsq
    fsq_levels: tuple = (8, 5, 5, 5)
    # training loss
    recon_loss: str = "l1"
    edge_weight: float = 0.0        # extra weight on pixels next to an edge of the target image

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.fsq_levels = tuple(self.fsq_levels)
        if isinstance(self.num_res_blocks, (list, tuple)):
            self.num_res_blocks = tuple(self.num_res_blocks)
        if self.kind != "vqgan":
            raise ValueError(f"VQGANConfig.kind must be 'vqgan', got {self.kind!r}")
        for name in ("image_size", "in_channels", "out_ch", "ch", "z_channels", "embed_dim", "n_embed", "norm_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VQGANConfig.{name} must be an int >= 1, got {v!r}")
        if not self.ch_mult or not all(isinstance(m, int) and m >= 1 for m in self.ch_mult):
            raise ValueError(f"VQGANConfig.ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult}")
        blocks = self.blocks_per_level
        if len(blocks) != len(self.ch_mult) or not all(isinstance(b, int) and b >= 0 for b in blocks):
            raise ValueError(f"VQGANConfig.num_res_blocks must be an int >= 0 or one per level "
                             f"({len(self.ch_mult)}), got {self.num_res_blocks!r}")
        down = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"VQGANConfig.image_size={self.image_size} is not a multiple of 2**(len(ch_mult)-1)={down}")
        widths = {self.ch * m for m in self.ch_mult} | {self.ch}
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"VQGANConfig.norm_groups={self.norm_groups} must divide every width {sorted(widths)}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"VQGANConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"VQGANConfig.recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or not all(isinstance(v, int) and v >= 2 for v in self.fsq_levels):
                raise ValueError(f"VQGANConfig.fsq_levels must be ints >= 2, got {self.fsq_levels}")
            if self.embed_dim != len(self.fsq_levels) or self.n_embed != math.prod(self.fsq_levels):
                raise ValueError(f"VQGANConfig with quantizer 'fsq' needs embed_dim = len(fsq_levels) = "
                                 f"{len(self.fsq_levels)} and n_embed = prod(fsq_levels) = {math.prod(self.fsq_levels)}, "
                                 f"got {self.embed_dim} and {self.n_embed}")
        if self.codebook_ema is not None and not 0 < self.codebook_ema < 1:
            raise ValueError(f"VQGANConfig.codebook_ema must be None or in (0, 1), got {self.codebook_ema}")
        if not self.beta >= 0 or not self.dead_code_threshold >= 0 or not self.edge_weight >= 0:
            raise ValueError("VQGANConfig.beta, dead_code_threshold and edge_weight must be >= 0")
        if not (self.temp_start > 0 and self.temp_end > 0):
            raise ValueError(f"VQGANConfig.temp_start and temp_end must be > 0, got {self.temp_start}, {self.temp_end}")

    @classmethod
    def for_quantizer(cls, quantizer: str, **kw) -> "VQGANConfig":
        """A config whose embed_dim / n_embed follow from fsq_levels when quantizer is 'fsq'."""
        if quantizer == "fsq":
            levels = tuple(kw.get("fsq_levels", cls.fsq_levels))
            kw = {**kw, "embed_dim": len(levels), "n_embed": math.prod(levels)}
        return cls(quantizer=quantizer, **kw)

    @property
    def blocks_per_level(self) -> tuple:
        b = self.num_res_blocks
        return tuple(b) if isinstance(b, (tuple, list)) else (b,) * len(self.ch_mult)

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.n_embed


# ---- encoder and decoder (taming's layout) --------------------------------------------------------

def _conv(n_in, n_out, k=3, stride=1, padding=None):
    return nn.Conv2d(n_in, n_out, k, stride, (k - 1) // 2 if padding is None else padding)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))); a 1x1 nin_shortcut when the width changes."""

    def __init__(self, n_in: int, n_out: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, n_in, eps=1e-6)
        self.conv1 = _conv(n_in, n_out)
        self.norm2 = nn.GroupNorm(groups, n_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(n_out, n_out)
        if n_in != n_out:
            self.nin_shortcut = _conv(n_in, n_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, n: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, n, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (_conv(n, n, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (rearrange(f(y), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """3x3 stride-2 conv after zero padding right and bottom (taming's asymmetric pad), or 2x2 average pooling."""

    def __init__(self, n: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = _conv(n, n, 3, stride=2, padding=0)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv when with_conv."""

    def __init__(self, n: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = _conv(n, n)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def _level(blocks: list, attn: list, resample: Optional[nn.Module], name: str) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(n: int, c: VQGANConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(n, n, c.norm_groups, c.dropout)
    mid.attn_1 = AttnBlock(n, c.norm_groups)
    mid.block_2 = ResnetBlock(n, n, c.norm_groups, c.dropout)
    return mid


def _run_level(level: nn.Module, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """conv_in -> per level: ResnetBlocks (+ attention at attn_resolutions), downsample -> mid -> norm, swish, conv_out."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.conv_in = _conv(c.in_channels, c.ch)
        self.down = nn.ModuleList()
        res, n = c.image_size, c.ch
        for i, (mult, nblocks) in enumerate(zip(c.ch_mult, c.blocks_per_level)):
            out = c.ch * mult
            blocks = [ResnetBlock(n if j == 0 else out, out, c.norm_groups, c.dropout) for j in range(nblocks)]
            n = out if nblocks else n
            attn = [AttnBlock(n, c.norm_groups) for _ in range(nblocks)] if res in c.attn_resolutions else []
            last = i == len(c.ch_mult) - 1
            self.down.append(_level(blocks, attn, None if last else Downsample(n, c.resamp_with_conv), "downsample"))
            res = res if last else res // 2
        self.mid = _mid(n, c)
        self.norm_out = nn.GroupNorm(c.norm_groups, n, eps=1e-6)
        self.conv_out = _conv(n, c.z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> per level, coarse to fine: ResnetBlocks (+ attention), upsample -> norm, swish, conv_out."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        n = c.ch * c.ch_mult[-1]
        res = c.grid_size
        self.conv_in = _conv(c.z_channels, n)
        self.mid = _mid(n, c)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            out = c.ch * c.ch_mult[i]
            nblocks = c.blocks_per_level[i] + 1
            blocks = [ResnetBlock(n if j == 0 else out, out, c.norm_groups, c.dropout) for j in range(nblocks)]
            n = out
            attn = [AttnBlock(n, c.norm_groups) for _ in range(nblocks)] if res in c.attn_resolutions else []
            levels.append(_level(blocks, attn, Upsample(n, c.resamp_with_conv) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(reversed(levels))  # up[0] is the finest level, as in taming
        self.norm_out = nn.GroupNorm(c.norm_groups, n, eps=1e-6)
        self.conv_out = _conv(n, c.out_ch)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- the model -----------------------------------------------------------------------------------

class VQGAN(ImageTokenizerMixin, nn.Module):
    """Encoder + quantizer + decoder in taming's VQModel layout; encode / decode / vocab_size / grid_size /
    grid() are the image-tokenizer interface (dalle_ar.image_tokenizer)."""

    config_class, label = VQGANConfig, "VQGAN"

    def __init__(self, config: VQGANConfig):
        super().__init__()
        if not isinstance(config, VQGANConfig):
            raise ValueError(f"config must be a VQGANConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = _conv(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = _conv(c.embed_dim, c.z_channels, 1)
        self.quantize = build_quantizer(c)

    def _check_images(self, images):
        c = self.config
        return check_images(images, c.in_channels, c.image_size)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> pre-quantization latents [B, embed_dim, h, w] (with gradients)."""
        x = self._check_images(images)
        dtype = self.quant_conv.weight.dtype
        return self.quant_conv(self.encoder((2 * x - 1).to(dtype)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] float in [0,1] -> LongTensor [B, grid, grid] (nearest code / argmax, no noise)."""
        q = self.quantize
        z = self.latents(images)
        if isinstance(q, VectorQuantizer) and q.c.l2_norm_codes:
            z = F.normalize(z, dim=1)
        return q.codes(z).long()

    def _embed(self, codes):
        q = self.quantize
        return q.embed(codes) if isinstance(q, VectorQuantizer) else q.embed_codes(codes)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents -> decoder output in [-1, 1] space (unclamped)."""
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype))).float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes [B, grid, grid] -> float32 images [B,C,H,W] in [0,1]."""
        g = self.grid_size
        codes = check_tokens("codes", codes, (None, g, g), self.vocab_size, "vocab_size")
        return ((self.decode_latents(self._embed(codes)) + 1) / 2).clamp(0, 1)

    # -- training
    def set_step(self, step: Optional[int]) -> None:
        """Schedules that follow the optimizer step (the Gumbel temperature)."""
        c = self.config
        if isinstance(self.quantize, GumbelQuantizer):
            self.quantize.temperature = cosine_ramp(step, c.temp_anneal_steps, c.temp_start, c.temp_end)

    def reconstruct(self, images: torch.Tensor, step: Optional[int] = None):
        """-> (reconstruction in [-1,1] space, quantizer loss, codes), with gradients."""
        self.set_step(step)
        z_q, q_loss, codes = self.quantize(self.latents(images))
        return self.decode_latents(z_q), q_loss, codes

    def recon_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1 / L2 in [-1,1] space, with edge_weight extra weight next to target edges."""
        c = self.config
        err = (recon - target).abs() if c.recon_loss == "l1" else (recon - target).pow(2)
        if c.edge_weight:
            err = err * (1 + c.edge_weight * edge_map(target))
        return err.mean()

    def forward(self, images: torch.Tensor, step: Optional[int] = None, extra_loss=None):
        """-> (loss, parts): reconstruction + quantizer loss. parts: recon, quant, psnr, used (codes in the batch).
        extra_loss(reconstruction, target, reconstruction loss) -> (loss, parts), all in [-1,1] space with
        gradients: training terms added here, inside forward (the GAN and perceptual terms of
        dalle_ar/vqgan_loss.py; under DeepSpeed they are then part of the engine's forward, whose outputs
        may be differentiated only by engine.backward)."""
        x = self._check_images(images).float()
        target = 2 * x - 1
        recon, q_loss, codes = self.reconstruct(x, step)
        rec = self.recon_loss(recon, target)
        parts = {"recon": rec.detach(), "quant": q_loss.detach().float(),
                 "psnr": psnr(((recon.detach() + 1) / 2).clamp(0, 1), x),
                 "used": torch.tensor(float(codes.unique().numel()))}
        loss = rec + q_loss
        if extra_loss is not None:
            more, more_parts = extra_loss(recon, target, rec)
            loss = loss + more
            parts.update(more_parts)
        return loss, parts

    # -- save / load
    def save_pretrained(self, directory, state_dict: Optional[dict] = None) -> Path:
        """Write config.json (kind "vqgan") + model.safetensors (`state_dict`, e.g. consolidated by the engine, or the module's)."""
        return self.write_pretrained(directory, self.state_dict() if state_dict is None else state_dict)


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,1,H,W]: 1 where a pixel differs from a 4-neighbour (both sides of every edge), else 0."""
    x = images.detach()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True) > 1e-3
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True) > 1e-3
    e = torch.zeros_like(x[:, :1], dtype=torch.bool)
    e[..., :, 1:] |= dx
    e[..., :, :-1] |= dx
    e[..., 1:, :] |= dy
    e[..., :-1, :] |= dy
    return e.to(images.dtype)
