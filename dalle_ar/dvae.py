"""The image tokenizer: a discrete VAE (DALL-E, Ramesh et al. 2021, section 2.1).

    images [B,3,H,W] in [0,1] --map--> encoder --> logits [B,V,h,w] --argmax--> codes [B,h,w]
    codes --decoder--> (mu, log b) per pixel and channel --sigmoid(mu), unmap--> images [0,1]

Training relaxes the argmax with Gumbel-softmax against a uniform prior (so KL = log V - H(q)
per latent), scores pixels with the logit-Laplace likelihood (or MSE) and ramps the KL weight
beta (0 -> kl_weight) and the temperature tau (temp_start -> temp_end) on cosine schedules read
from the training step. The paper's values are the defaults (beta 6.6 over 5k updates, tau
1 -> 1/16 over 150k); short runs shorten both step counts.

Parameter names and shapes follow OpenAI's released `dall_e` package (v0.1): `encoder.blocks.*`
and `decoder.blocks.*` here are their Encoder's and Decoder's `blocks.*`, so their weights load
after `dalle-ar convert openai-dvae` (dalle_ar/convert.py). With group_count=4,
n_blk_per_group=2, n_hid=256, vocab_size=8192, n_init=128 the layout is theirs exactly; other
sizes generalise it: encoder group g of G has 2**(g-1) * n_hid channels, decoder group g has
2**(G-g) * n_hid, with a 2x max-pool / nearest upsample after every group but the last.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .checks import check_images, check_tokens
from .image_tokenizer import ImageTokenizerMixin
from .quantizers import FSQ

LOSSES = ("logit_laplace", "mse")
QUANTIZERS = ("gumbel", "fsq")


@dataclass
class DVAEConfig:
    image_size: int = 64            # square images; a multiple of 2**(group_count-1)
    input_channels: int = 3
    n_hid: int = 64                 # width of the first encoder / last decoder group (multiple of 4)
    group_count: int = 4            # downsampling 2**(group_count-1): 64 px -> 8 x 8 codes
    n_blk_per_group: int = 1
    vocab_size: int = 512
    n_init: int = 128               # decoder width right after the one-hot input
    loss: str = "logit_laplace"     # or "mse" (decoder predicts mu only; rescale kl_weight, see forward)
    logit_laplace_eps: float = 0.1  # pixels are mapped into (eps, 1 - eps)
    # beta weighs the KL *summed over latents* against the NLL *summed over pixels* (the loss
    # divides both by the pixel count, so 6.6 means what it means in the paper).
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5000     # cosine 0 -> kl_weight over these steps (paper: 5000)
    temp_start: float = 1.0
    temp_end: float = 1 / 16
    temp_anneal_steps: int = 150000  # cosine temp_start -> temp_end (paper: 150000)
    straight_through: bool = False  # hard one-hot forward, soft gradient
    # From this optimizer step on, the encoder is frozen (requires_grad off) and the decoder trains on
    # its argmax codes (no Gumbel noise, no relaxation): on exactly what decode(encode(x)) sees. A
    # final phase like this sharpens small, short runs (the dvae stage restarts the LR schedule
    # there, TrainConfig.restart_at); train with ZeRO-0 (ZeRO 1-3's flat optimizer partitions still
    # nudge a frozen encoder). None: relax to the end, as in the paper.
    hard_codes_from_step: Optional[int] = None
    # Multiplies the encoder's last conv at init. The released init gives logits with std ~0.1,
    # drowned by Gumbel noise (std 1.28), so small, short runs collapse onto a few codes.
    logit_init_scale: float = 1.0
    # EMA of the weights, off by default. A shadow copy kept outside state_dict() (so optimizers,
    # ZeRO partitioning and checkpoints never see it), updated once per training step and written
    # by save_pretrained instead of the live weights. Not with ZeRO-3; not resumable: a resumed
    # run restarts the average from the checkpoint's weights.
    ema_decay: Optional[float] = None
    # "gumbel": the paper's relaxed codes (above). "fsq": finite scalar quantization (Mentzer et al.
    # 2023, dalle_ar/quantizers.py) between the same encoder and decoder: the encoder's last conv
    # gives len(fsq_levels) channels, each rounded to one of its levels (straight-through), and the
    # decoder's first conv reads them; vocab_size = prod(fsq_levels), no codebook, no KL or
    # temperature (their fields are unused). The VQ family on the dVAE's cheap body.
    quantizer: str = "gumbel"
    fsq_levels: tuple = ()
    kind: str = "dvae"              # config.json names the image tokenizer (dalle_ar.image_tokenizer)

    def __post_init__(self):
        if self.kind != "dvae":
            raise ValueError(f"DVAEConfig.kind must be 'dvae', got {self.kind!r}")
        for name in ("image_size", "input_channels", "n_hid", "group_count", "n_blk_per_group",
                     "vocab_size", "n_init", "kl_warmup_steps", "temp_anneal_steps"):
            v = getattr(self, name)
            low = 0 if name.endswith("_steps") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"DVAEConfig.{name} must be an int >= {low}, got {v!r}")
        if self.n_hid % 4:
            raise ValueError(f"DVAEConfig.n_hid must be a multiple of 4 (blocks are n_out/4 wide), got {self.n_hid}")
        if self.image_size % 2 ** (self.group_count - 1):
            raise ValueError(f"DVAEConfig.image_size={self.image_size} is not a multiple of "
                             f"2**(group_count-1)={2 ** (self.group_count - 1)}")
        if self.loss not in LOSSES:
            raise ValueError(f"DVAEConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0 < self.logit_laplace_eps < 0.5:
            raise ValueError(f"DVAEConfig.logit_laplace_eps must be in (0, 0.5), got {self.logit_laplace_eps}")
        if not self.kl_weight >= 0:
            raise ValueError(f"DVAEConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if not (self.temp_start > 0 and self.temp_end > 0):
            raise ValueError(f"DVAEConfig.temp_start and temp_end must be > 0, got {self.temp_start}, {self.temp_end}")
        if not self.logit_init_scale > 0:
            raise ValueError(f"DVAEConfig.logit_init_scale must be > 0, got {self.logit_init_scale}")
        h = self.hard_codes_from_step
        if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h < 0):
            raise ValueError(f"DVAEConfig.hard_codes_from_step must be None or an int >= 0, got {h!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"DVAEConfig.ema_decay must be None or in (0, 1), got {self.ema_decay}")
        self.fsq_levels = tuple(self.fsq_levels)
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"DVAEConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2
                                              for v in self.fsq_levels):
                raise ValueError(f"DVAEConfig.fsq_levels must be ints >= 2 with quantizer 'fsq', got {self.fsq_levels}")
            if self.vocab_size != math.prod(self.fsq_levels):
                raise ValueError(f"DVAEConfig with quantizer 'fsq' needs vocab_size = prod(fsq_levels) = "
                                 f"{math.prod(self.fsq_levels)}, got {self.vocab_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (self.group_count - 1)

    @property
    def latent_channels(self) -> int:
        """Channels between encoder and decoder: one logit per code (gumbel) or one per FSQ level set."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.vocab_size


# ---- layers (names and shapes as in OpenAI's dall_e package) -------------------------------------

class Conv2d(nn.Module):
    """A 'same' convolution holding `w` [out, in, k, k] and `b` [out] (OpenAI's parameter names).

    A 1x1 conv also takes integer codes [B,h,w] as a one-hot input: it looks up columns of `w`
    instead of building a [B,V,h,w] one-hot tensor (through the module call, so ZeRO-3 gathers w).
    """

    # Without autograd (encode, decode, the frozen encoder of the decoder-only phase) convolutions run
    # channels-last, input and a per-call copy of the weight: faster on CPU (figures: docs/benchmarks.md,
    # bench/dvae.py). Training keeps the default layout: the relaxed phase's outcome depends on
    # floating-point details, and this layout reproduces the shipped run.
    inference_memory_format = torch.channels_last

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        # Variance-preserving normal init, zero bias, as in the released model.
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.kw = kw

    def forward(self, x):
        if not x.is_floating_point():
            h = F.embedding(x, self.w[:, :, 0, 0].t()) + self.b   # [B,h,w,out]
            return rearrange(h, "b h w c -> b c h w")
        # Follow the weights' dtype, so a bf16 engine can hand the model fp32 images.
        x, w = x.to(self.w.dtype), self.w
        if not torch.is_grad_enabled():
            fmt = self.inference_memory_format
            x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        return F.conv2d(x, w, self.b, padding=(self.kw - 1) // 2)


class ResBlock(nn.Module):
    """id_path(x) + post_gain * res_path(x); res_path is four ReLU-conv pairs at width n_out/4.

    The encoder's kernels are 3,3,3,1 and the decoder's 1,3,3,3; post_gain = 1/n_layers**2
    keeps the sum of many residual branches small at init.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple):
        super().__init__()
        n_mid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_mid, n_mid, n_mid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _stack(c: DVAEConfig, first: nn.Module, first_width: int, widths: list, kernels: tuple,
           resample: str, last: nn.Module) -> nn.Sequential:
    """input -> group_1..group_G (blocks, then `resample` between groups) -> output (ReLU, conv)."""
    n_layers = c.group_count * c.n_blk_per_group
    layers, width = [("input", first)], first_width
    for g, out in enumerate(widths, start=1):
        group = [(f"block_{i + 1}", ResBlock(width if i == 0 else out, out, n_layers, kernels))
                 for i in range(c.n_blk_per_group)]
        if g < c.group_count:
            group.append(("pool", nn.MaxPool2d(kernel_size=2)) if resample == "pool"
                         else ("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
        layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        width = out
    layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", last)]))))
    return nn.Sequential(OrderedDict(layers))


class Encoder(nn.Module):
    """7x7 conv -> groups of ResBlocks (max-pool 2 between groups) -> ReLU -> 1x1 conv to vocab logits."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        widths = [c.n_hid * 2 ** g for g in range(c.group_count)]
        out = Conv2d(widths[-1], c.latent_channels, 1)
        with torch.no_grad():
            out.w.mul_(c.logit_init_scale)
        self.blocks = _stack(c, Conv2d(c.input_channels, c.n_hid, 7), c.n_hid, widths, (3, 3, 3, 1), "pool", out)

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    """1x1 conv from one-hot codes -> groups of ResBlocks (nearest upsample 2 between) -> ReLU -> 1x1 conv.

    Takes relaxed one-hot codes [B,V,h,w] (training) or integer codes [B,h,w]; returns per-pixel
    statistics [B, 2C, H, W] (logit-Laplace mu, log b) or [B, C, H, W] (mse: mu).
    """

    def __init__(self, c: DVAEConfig):
        super().__init__()
        widths = [c.n_hid * 2 ** g for g in reversed(range(c.group_count))]
        n_out = c.input_channels * (2 if c.loss == "logit_laplace" else 1)
        self.blocks = _stack(c, Conv2d(c.latent_channels, c.n_init, 1), c.n_init, widths, (1, 3, 3, 3), "upsample",
                             Conv2d(widths[-1], n_out, 1))

    def forward(self, z):
        return self.blocks(z)


# ---- schedules and metrics -----------------------------------------------------------------------

def cosine_ramp(step: Optional[int], steps: int, start: float, end: float) -> float:
    """start -> end along half a cosine over `steps`; `end` from then on, and when step is None."""
    if step is None or step >= steps:
        return float(end)
    t = max(int(step), 0) / steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over images of the PSNR (dB) between [0,1] image batches [B,C,H,W]; capped at 100 dB."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean()


@torch.no_grad()
def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict:
    """{"perplexity": exp(entropy of the code histogram), "used_fraction": share of codes seen at least once}."""
    codes = codes.reshape(-1).long().cpu()
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab_size):
        raise ValueError(f"codebook_usage: codes span [{int(codes.min())}, {int(codes.max())}], "
                         f"outside [0, vocab_size={vocab_size})")
    p = torch.bincount(codes, minlength=vocab_size).double()
    used = float((p > 0).double().mean())
    p = p[p > 0] / p.sum().clamp_min(1)
    return {"perplexity": float((-(p * p.log()).sum()).exp()), "used_fraction": used}


# ---- the model -----------------------------------------------------------------------------------

class DiscreteVAE(ImageTokenizerMixin, nn.Module):
    """The dVAE; encode / decode / vocab_size / grid_size / grid() are the image-tokenizer interface."""

    config_class, label = DVAEConfig, "dVAE"

    def __init__(self, config: DVAEConfig):
        super().__init__()
        if not isinstance(config, DVAEConfig):
            raise ValueError(f"config must be a DVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "fsq":  # buffers only (outside the state dict): the weights stay OpenAI's layout
            self.fsq = FSQ(config)
        # A plain attribute (a dict, not a buffer or module): outside state_dict(), optimizers and ZeRO.
        self._ema, self._ema_step, self._ema_updates = None, None, 0

    # -- pixels <-> model space (OpenAI's map_pixels / unmap_pixels)
    def map_pixels(self, x):
        eps = self.config.logit_laplace_eps
        return (1 - 2 * eps) * x + eps

    def unmap_pixels(self, x):
        eps = self.config.logit_laplace_eps
        return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)

    def _check_images(self, images) -> torch.Tensor:
        return check_images(images, self.config.input_channels, self.config.image_size)

    def _check_codes(self, codes) -> torch.Tensor:
        g = self.grid_size
        return check_tokens("codes", codes, (None, g, g), self.config.vocab_size, "vocab_size")

    def _pixels(self, stats):
        """Decoder statistics -> [0,1] images: logit-Laplace: sigmoid of mu, unmapped; mse: mu, unmapped."""
        mu = stats[:, : self.config.input_channels].float()
        return self.unmap_pixels(torch.sigmoid(mu) if self.config.loss == "logit_laplace" else mu)

    # -- inference
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder logits [B,V,h,w] for [0,1] images (with gradients)."""
        return self.encoder(self.map_pixels(self._check_images(images).float()))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] float in [0,1] -> LongTensor [B, grid, grid] (argmax codes, no Gumbel noise; fsq: rounded)."""
        z = self.logits(images)
        return self.fsq.codes(z) if self.config.quantizer == "fsq" else z.argmax(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes [B, grid, grid] -> float32 images [B,C,H,W] in [0,1]."""
        codes = self._check_codes(codes)
        return self._pixels(self.decoder(self.fsq.embed_codes(codes) if self.config.quantizer == "fsq" else codes))

    # -- schedules
    def kl_weight(self, step: Optional[int] = None) -> float:
        """beta at `step`: cosine 0 -> kl_weight over kl_warmup_steps (full weight when step is None)."""
        c = self.config
        return cosine_ramp(step, c.kl_warmup_steps, 0.0, c.kl_weight)

    def temperature(self, step: Optional[int] = None) -> float:
        """tau at `step`: cosine temp_start -> temp_end over temp_anneal_steps (temp_end when step is None)."""
        c = self.config
        return cosine_ramp(step, c.temp_anneal_steps, c.temp_start, c.temp_end)

    def hard_codes(self, step: Optional[int] = None) -> bool:
        """True when `step` is in the final phase that trains the decoder alone on argmax codes."""
        h = self.config.hard_codes_from_step
        return h is not None and step is not None and step >= h

    # -- training
    def forward(self, images: torch.Tensor, step: Optional[int] = None):
        """-> (loss, parts). loss = (NLL summed over pixels + beta * KL summed over latents) / pixels.

        Pass the optimizer step: it drives beta and tau (None means the end of both schedules) and,
        from `hard_codes_from_step` on, the decoder-only phase on argmax codes (never when None).
        parts: recon (NLL or MSE per pixel), kl (nats per latent), kl_weight, temperature, psnr
        (dB of the reconstruction the decoder was given), all float tensors.
        With loss="mse" the reconstruction term is ~1e-3, not nats: use a kl_weight ~1000x smaller.
        """
        c = self.config
        if self.training and torch.is_grad_enabled() and c.ema_decay is not None:
            self._update_ema(step)
        x = self._check_images(images).float()
        y = self.map_pixels(x)
        if c.quantizer == "fsq":
            return self._fsq_forward(x, y, step)
        tau, beta = self.temperature(step), self.kl_weight(step)
        if self.hard_codes(step):
            # Frozen, not merely without gradient: DeepSpeed zero-fills the missing gradients of
            # parameters that require grad, and AdamW's momentum and weight decay would then keep
            # moving the encoder (its codes drifting under the decoder) through the whole phase.
            self.encoder.requires_grad_(False)
            with torch.no_grad():
                logits = self.encoder(y).float()
            stats = self.decoder(logits.argmax(1)).float()
        else:
            logits = self.encoder(y).float()
            z = F.gumbel_softmax(logits, tau=tau, hard=c.straight_through, dim=1)
            stats = self.decoder(z).float()
        recon = self._nll(stats, y).mean()

        # KL(q || uniform) = log V - H(q) at each latent position.
        logq = logits.log_softmax(1)
        kl = (logq.exp() * logq).sum(1).mean() + math.log(c.vocab_size)
        latents_per_pixel = logits[0, 0].numel() / x[0].numel()
        loss = recon + beta * latents_per_pixel * kl

        parts = {"recon": recon.detach(), "kl": kl.detach(), "kl_weight": torch.tensor(beta),
                 "temperature": torch.tensor(tau), "psnr": psnr(self._pixels(stats.detach()), x)}
        return loss, parts

    def _nll(self, stats, y):
        """Per-pixel reconstruction loss of decoder statistics against y (model space)."""
        c = self.config
        mu = stats[:, : c.input_channels]
        if c.loss == "logit_laplace":
            # y in (eps, 1-eps) has density exp(-|logit y - mu| / b) / (2 b y (1 - y)).
            log_b = stats[:, c.input_channels:]
            return (y.logit() - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(y * (1 - y))
        # A linear output: a sigmoid here saturates on flat backgrounds and stalls learning.
        return (mu - y).pow(2)

    def _fsq_forward(self, x, y, step):
        """quantizer="fsq": the reconstruction loss through rounded latents (no KL); the decoder-only
        phase freezes the encoder as for gumbel. parts: recon, psnr."""
        if self.hard_codes(step):
            self.encoder.requires_grad_(False)
            with torch.no_grad():
                z = self.encoder(y).float()
        else:
            z = self.encoder(y).float()
        stats = self.decoder(self.fsq(z)[0]).float()
        recon = self._nll(stats, y).mean()
        return recon, {"recon": recon.detach(), "psnr": psnr(self._pixels(stats.detach()), x)}

    # -- EMA of the weights (optional)
    @torch.no_grad()
    def _update_ema(self, step: Optional[int]):
        """Fold the current weights into the average, once per optimizer step (several micro-batches
        of one step share `step`). The decay warms up as min(d, (1+n)/(10+n)) so early weights fade."""
        if step is not None and step == self._ema_step:
            return
        params = dict(self.named_parameters())
        if any(hasattr(p, "ds_numel") and p.ds_numel != p.numel() for p in params.values()):
            raise ValueError("DVAEConfig.ema_decay is not supported with ZeRO stage 3 (partitioned weights)")
        self._ema_step = step
        if self._ema is None:
            self._ema = {k: p.detach().float().clone() for k, p in params.items()}
            return
        self._ema_updates += 1
        d = min(self.config.ema_decay, (1 + self._ema_updates) / (10 + self._ema_updates))
        for k, p in params.items():
            e = self._ema[k]
            if e.device != p.device:
                e = self._ema[k] = e.to(p.device)
            e.lerp_(p.detach().float(), 1 - d)

    def ema_state_dict(self) -> Optional[dict]:
        """The EMA weights as a full state dict, or None before the first training step."""
        if self._ema is None:
            return None
        return {k: self._ema[k].to(v.dtype) if k in self._ema else v for k, v in self.state_dict().items()}

    # -- save / load
    def save_pretrained(self, directory, state_dict: Optional[dict] = None, use_ema: bool = True) -> Path:
        """Write config.json + model.safetensors. Writes the EMA weights when there are some (ema_decay set
        and trained) unless use_ema=False; else `state_dict` (e.g. consolidated by the engine) or the module's."""
        if use_ema and self._ema is not None:
            state_dict = self.ema_state_dict()
        elif state_dict is None:
            state_dict = self.state_dict()
        return self.write_pretrained(directory, state_dict)
