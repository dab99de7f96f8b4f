"""The VQGAN's training-only losses: a patch-GAN discriminator and an LPIPS-style perceptual loss.

Neither is part of the tokenizer: `dalle-ar export` writes the VQGAN alone (config.json +
model.safetensors); the discriminator lives in the training run's checkpoints, the perceptual
network in the user's own weights file.

- `PatchDiscriminator`: taming-transformers' NLayerDiscriminator layout (`main.N.*`): a 4x4
  stride-2 conv + LeakyReLU(0.2), then `disc_layers - 1` more stride-2 convs and one stride-1
  conv, each with a norm, and a final 1-channel 4x4 conv: one logit per overlapping patch.
- `d_loss` (hinge or vanilla) for the discriminator, `g_loss` = -mean(logits on fakes) for the
  generator, weighted by taming's adaptive weight: ||grad nll|| / ||grad g_loss|| w.r.t. the
  decoder's last layer weight, clamped to [0, 1e4], times disc_weight; nothing before disc_start.
- `Perceptual`: LPIPS (Zhang et al. 2018) on a VGG16 feature stack in torchvision's parameter
  names (`features.N.weight/bias`) with the lpips package's linear heads (`lin0..lin4.model.1.weight`,
  as in taming's vgg.pth). Weights come only from local files, never downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .vqgan import VQGANConfig

DISC_LOSSES = ("hinge", "vanilla")
DISC_NORMS = ("batch", "group")


@dataclass
class VQGANLossConfig:
    """The adversarial and perceptual terms of `dalle-ar train vqgan` (recorded in stage.json, not exported)."""

    disc_weight: float = 0.0        # 0: no discriminator at all; else the GAN term's weight (x adaptive weight)
    disc_start: int = 0             # optimizer step at which the GAN terms switch on (before: weight 0, D not updated)
    disc_factor: float = 1.0        # multiplies both the generator's and the discriminator's GAN loss once on
    disc_layers: int = 3            # NLayerDiscriminator's n_layers
    disc_ndf: int = 64              # its first layer's width
    disc_norm: str = "group"        # "group" (per-sample, no buffers: see docs/training.md) or "batch" (taming's)
    disc_loss: str = "hinge"        # or "vanilla" (softplus)
    adaptive_weight: bool = True    # taming's grad-norm ratio; False: the GAN term's weight is disc_weight
    perceptual_weight: float = 0.0  # LPIPS weight in the reconstruction loss (needs perceptual_weights)
    perceptual_weights: tuple = ()  # local file(s): VGG16 features.* + LPIPS lin0..lin4 (.safetensors or .pth)

    def __post_init__(self):
        self.perceptual_weights = (self.perceptual_weights,) if isinstance(self.perceptual_weights, str) \
            else tuple(self.perceptual_weights)
        for name in ("disc_weight", "disc_factor", "perceptual_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"VQGANLossConfig.{name} must be a number >= 0, got {v!r}")
        for name, low in (("disc_start", 0), ("disc_layers", 1), ("disc_ndf", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"VQGANLossConfig.{name} must be an int >= {low}, got {v!r}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"VQGANLossConfig.disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}")
        if self.disc_norm not in DISC_NORMS:
            raise ValueError(f"VQGANLossConfig.disc_norm must be one of {DISC_NORMS}, got {self.disc_norm!r}")
        if self.perceptual_weight and not self.perceptual_weights:
            raise ValueError("VQGANLossConfig.perceptual_weight > 0 needs perceptual_weights: local file(s) with "
                             "VGG16 features.* and LPIPS lin0..lin4 weights (nothing is downloaded)")

    @property
    def gan(self) -> bool:
        return self.disc_weight > 0

    def gan_on(self, step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step (the same on every rank)."""
        return self.gan and self.disc_factor > 0 and step >= self.disc_start


@dataclass
class VQGANTrainingConfig(VQGANLossConfig, VQGANConfig):
    """The `model` section of `dalle-ar train vqgan`: the tokenizer's VQGANConfig fields plus the
    VQGANLossConfig ones. Only `tokenizer_config()` is exported (config.json); the loss fields stay in the
    run's stage.json."""

    def __post_init__(self):
        VQGANConfig.__post_init__(self)
        VQGANLossConfig.__post_init__(self)

    def tokenizer_config(self) -> VQGANConfig:
        return VQGANConfig(**{f.name: getattr(self, f.name) for f in fields(VQGANConfig)})

    def loss_config(self) -> VQGANLossConfig:
        return VQGANLossConfig(**{f.name: getattr(self, f.name) for f in fields(VQGANLossConfig)})


# ---- the discriminator -----------------------------------------------------------------------------

class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d computed in fp32: under bf16/fp16 DeepSpeed casts the parameters but keeps the running
    statistics (buffers) fp32, which batch_norm refuses to mix."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps).to(x.dtype)


def _norm(kind: str, n: int) -> nn.Module:
    return _BatchNorm(n) if kind == "batch" else nn.GroupNorm(min(32, n), n)


class PatchDiscriminator(nn.Module):
    """[B,3,H,W] in [-1,1] -> patch logits [B,1,h,w] (taming's NLayerDiscriminator)."""

    def __init__(self, cfg: VQGANLossConfig, in_channels: int = 3):
        super().__init__()
        ndf, norm = cfg.disc_ndf, cfg.disc_norm
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, cfg.disc_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < cfg.disc_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss: hinge 0.5 (E relu(1 - real) + E relu(1 + fake)), or vanilla
    0.5 (E softplus(-real) + E softplus(fake))."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    if kind == "vanilla":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"kind must be one of {DISC_LOSSES}, got {kind!r}")


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss (taming's, for either discriminator loss)."""
    return -logits_fake.mean()


def conv_weight_grad(layer_in: torch.Tensor, grad_out: torch.Tensor, conv: nn.Conv2d, weight_shape) -> torch.Tensor:
    """d loss / d conv.weight from the conv's input and the gradient at its output: exactly what autograd puts in
    weight.grad. Going through the activations rather than the parameter works under ZeRO-3 too, where the
    weight is a partitioned shard outside its engine's forward."""
    return torch.nn.grad.conv2d_weight(layer_in.detach(), weight_shape, grad_out, stride=conv.stride,
                                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def adaptive_weight(nll_grad_norm: torch.Tensor, g_grad_norm: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """taming's balance of the GAN term against the reconstruction: ||grad nll|| / (||grad g|| + 1e-4), clamped
    to [0, 1e4], detached, times disc_weight."""
    return (nll_grad_norm / (g_grad_norm + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


class LastLayer:
    """Keeps the input and output of a conv (the decoder's last, `decoder.conv_out`) in the current forward:
    the adaptive weight's gradient norms w.r.t. its weight come from them (see `conv_weight_grad`)."""

    def __init__(self, conv: nn.Conv2d):
        self.conv, self.io = conv, None
        conv.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.io = (inputs[0], output) if torch.is_grad_enabled() and output.requires_grad else None

    def grad_norm(self, grad_out: torch.Tensor) -> torch.Tensor:
        shape = getattr(self.conv.weight, "ds_shape", self.conv.weight.shape)  # ZeRO-3: the live weight is a shard
        return conv_weight_grad(self.io[0], grad_out, self.conv, shape).norm()


def generator_terms(cfg: VQGANLossConfig, recon: torch.Tensor, target: torch.Tensor, nll: torch.Tensor,
                    perceptual: "Perceptual | None" = None, disc: "nn.Module | None" = None,
                    last_layer: "LastLayer | None" = None, dtype=None) -> tuple:
    """The generator's perceptual and GAN terms -> (loss to add, parts). recon / target in [-1,1], nll the
    reconstruction loss (all with gradients). `disc` is the discriminator's module, its parameters frozen by
    the caller; it is differentiated once, here, and the GAN term enters the loss as a surrogate with the
    same value and the same gradient for the generator: a backward through the returned loss never
    re-enters the discriminator (under ZeRO-3 a second backward through it finds its weights released).
    The adaptive weight (with `last_layer`, which saw this forward) uses the gradients at the last layer's
    output, never its parameter (a partitioned shard under ZeRO-3)."""
    loss, parts = 0.0, {}
    if perceptual is not None:
        p = perceptual.to(recon.device)(target, recon).mean()
        nll, loss = nll + cfg.perceptual_weight * p, loss + cfg.perceptual_weight * p
        parts["perceptual"] = p.detach()
    if disc is not None:
        g = g_loss(disc(recon.to(dtype or recon.dtype)).float())
        if cfg.adaptive_weight:
            layer_out = last_layer.io[1]
            grad_recon, grad_out = torch.autograd.grad(g, (recon, layer_out), retain_graph=True)
            (nll_out,) = torch.autograd.grad(nll, layer_out, retain_graph=True)
            weight = adaptive_weight(last_layer.grad_norm(nll_out), last_layer.grad_norm(grad_out), cfg.disc_weight)
        else:
            (grad_recon,) = torch.autograd.grad(g, recon, retain_graph=True)
            weight = torch.tensor(float(cfg.disc_weight))
        surrogate = (recon * grad_recon.detach()).sum()  # its gradient w.r.t. the generator is g's
        loss = loss + cfg.disc_factor * weight * (g.detach() + surrogate - surrogate.detach())
        parts.update(g_loss=g.detach(), g_weight=weight.detach())
    return loss, parts


def discriminator_loss(cfg: VQGANLossConfig, disc, real: torch.Tensor, fake: torch.Tensor) -> tuple:
    """The discriminator's loss on real images and (detached) reconstructions -> (loss, parts)."""
    logits_real, logits_fake = disc(real).float(), disc(fake).float()
    loss = cfg.disc_factor * d_loss(logits_real, logits_fake, cfg.disc_loss)
    return loss, {"logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}


# ---- the perceptual loss -----------------------------------------------------------------------------

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)          # features.N after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's fixed input scaling (ImageNet statistics in [-1,1] space): constants, not weights.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class Perceptual(nn.Module):
    """LPIPS distance between images in [-1,1] -> [B]; frozen, loaded with `load_perceptual`."""

    def __init__(self):
        super().__init__()
        layers, n = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(n, v, 3, padding=1), nn.ReLU(inplace=False)]
                n = v
        self.features = nn.Sequential(*layers[:LPIPS_TAPS[-1] + 1])
        for k, c in enumerate(LPIPS_CHANNELS):  # lin{k}.model.1: the lpips package's NetLinLayer (dropout, conv)
            self.add_module(f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).to(self.shift.dtype)
        h = (h - self.shift) / self.scale
        total, tap = 0.0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == LPIPS_TAPS[tap]:
                fx, fy = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in h.chunk(2))
                total = total + getattr(self, f"lin{tap}").model((fx - fy).pow(2)).mean((1, 2, 3))
                tap += 1
        return total

    def train(self, mode: bool = True):  # always frozen in eval mode
        return super().train(False)


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"perceptual_weights: {path} not found (a local file: nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user error)
        raise ValueError(f"perceptual_weights: {path} is not a safetensors file or a weights-only torch "
                         f"state dict ({type(e).__name__}: {str(e)[:200]})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"perceptual_weights: {path} holds no state dict of tensors")
    return sd


def load_perceptual(paths, device=None) -> Perceptual:
    """A frozen `Perceptual` from local file(s) that together hold VGG16's `features.N.weight/bias`
    (torchvision's names, e.g. vgg16-397923af.pth; classifier.* is ignored) and LPIPS's
    `lin{k}.model.1.weight` (e.g. the lpips package's / taming's vgg.pth). ValueError naming the file
    for a missing, unreadable or mismatched one."""
    paths = [Path(p) for p in ((paths,) if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise ValueError("perceptual_weights: no file given")
    net = Perceptual()
    wanted = net.state_dict()
    found, origin = {}, {}
    for path in paths:
        for k, v in _read_weights(path).items():
            if k in wanted:
                if v.shape != wanted[k].shape:
                    raise ValueError(f"perceptual_weights: {path}: {k} has shape {tuple(v.shape)}, expected "
                                     f"{tuple(wanted[k].shape)} (VGG16 features / LPIPS lin heads)")
                found[k], origin[k] = v, path
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"perceptual_weights: {', '.join(map(str, paths))} lack {len(missing)} of {len(wanted)} "
                         f"tensors, e.g. {missing[:3]}: expected torchvision VGG16 features.N.* and LPIPS "
                         f"lin0..lin4.model.1.weight")
    net.load_state_dict(found)
    return net.to(device or "cpu")


def perceptual_state_dict_shapes() -> dict:
    """name -> shape of every tensor `load_perceptual` reads (to build a test file, or to check one)."""
    return {k: tuple(v.shape) for k, v in Perceptual().state_dict().items()}


__all__ = ["VQGANLossConfig", "VQGANTrainingConfig", "PatchDiscriminator", "d_loss", "g_loss", "adaptive_weight", "conv_weight_grad",
           "LastLayer", "generator_terms", "discriminator_loss",
           "Perceptual", "load_perceptual", "perceptual_state_dict_shapes", "DISC_LOSSES", "DISC_NORMS"]

