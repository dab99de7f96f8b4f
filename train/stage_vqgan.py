"""The VQGAN stage: the VQ-family image tokenizer on image shards, optionally against a discriminator."""

from __future__ import annotations

from dalle_ar import engine
from dalle_ar.vqgan import VQGAN
from dalle_ar.vqgan_loss import (LastLayer, PatchDiscriminator, VQGANTrainingConfig, discriminator_loss,
                                 generator_terms, load_perceptual)

from .stage import Built, ImageTokenizerStage


class VQGANStage(ImageTokenizerStage):
    """The VQ image tokenizer: reconstruction (L1/L2, edge-weighted) + the quantizer's loss, optionally an
    LPIPS-style perceptual term and a patch-GAN discriminator (dalle_ar/vqgan_loss.py), trained by the
    engine as an `Auxiliary` with its own optimizer. The model section takes both the tokenizer's and the
    loss's keys (VQGANTrainingConfig); the export holds the tokenizer only."""

    name = "vqgan"
    summary = "the VQ image tokenizer (VQGAN: vq, gumbel or fsq quantizer; optionally a patch-GAN discriminator)"
    model_config_cls = VQGANTrainingConfig

    def build_model(self):
        self.loss_cfg = lc = self.model_cfg.loss_config()
        self.perceptual = load_perceptual(lc.perceptual_weights) if lc.perceptual_weight else None
        model = VQGAN(self.model_cfg.tokenizer_config())
        self.last_layer = LastLayer(model.decoder.conv_out) if lc.gan and lc.adaptive_weight else None
        return model

    def build(self) -> Built:
        built = super().build()
        if self.loss_cfg.gan:
            built.aux = engine.Auxiliary(PatchDiscriminator(self.loss_cfg, self.model_cfg.out_ch), self.disc_loss_fn,
                                         active=self.loss_cfg.gan_on, name="d")
        return built

    def loss_fn(self, model, batch, step, disc=None):
        """The generator's loss; with `disc` (the discriminator's engine, from model.disc_start on) + the GAN
        term, computed inside the tokenizer's engine forward with the discriminator's module (frozen by the
        engine); the real and detached reconstructed images are left in `batch` for `disc_loss_fn`."""
        if self.perceptual is None and disc is None:
            return model(batch["image"], step=step)
        dtype = batch["image"].dtype

        def extra_loss(recon, target, nll):
            if disc is not None:
                batch["real"], batch["fake"] = target.to(dtype), recon.detach().to(dtype)
            return generator_terms(self.loss_cfg, recon, target, nll, self.perceptual,
                                   disc.module if disc is not None else None, self.last_layer, dtype)

        return model(batch["image"], step=step, extra_loss=extra_loss)

    def disc_loss_fn(self, disc, batch, step):
        return discriminator_loss(self.loss_cfg, disc, batch["real"], batch["fake"])
