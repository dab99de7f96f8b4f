"""The VQGAN stage: the VQ-family image tokenizer on image shards."""

from __future__ import annotations

from dalle_ar.vqgan import VQGAN, VQGANConfig

from .stage import ImageTokenizerStage


class VQGANStage(ImageTokenizerStage):
    """The VQ image tokenizer: reconstruction (L1/L2, edge-weighted) + the quantizer's loss."""

    name = "vqgan"
    summary = "the VQ image tokenizer (VQGAN: vq, gumbel or fsq quantizer) on image shards"
    model_config_cls = VQGANConfig

    def build_model(self):
        return VQGAN(self.model_cfg)

    def loss_fn(self, model, batch, step):
        return model(batch["image"], step=step)
