"""The VQGAN stage: the VQ-family image tokenizer on image shards."""

from __future__ import annotations

import dataclasses

import torch

from dalle_ar.dvae import codebook_usage
from dalle_ar.vqgan import VQGAN, VQGANConfig

from .stage import Stage, save_grid
from .stage_dvae import DVAEStage


class VQGANStage(Stage):
    """The VQ image tokenizer: reconstruction (L1/L2, edge-weighted) + the quantizer's loss."""

    name = "vqgan"
    model_config_cls = VQGANConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        return model_cfg, train_cfg, dataclasses.replace(data_cfg, image_size=model_cfg.image_size)

    def build_model(self):
        self.val_codes = []
        return VQGAN(self.model_cfg)

    def loss_fn(self, model, batch, step):
        return model(batch["image"], step=step)

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        x = self.fixed_batch(self.data.sample_count)["image"].to(next(model.parameters()).device)
        recon = model.decode(model.encode(x))
        save_grid(torch.cat([x, recon.float()]).cpu(), x.shape[0], self.out / "samples" / f"step{step:08d}.png",
                  writer, "vqgan/originals_vs_reconstructions", step)

    eval_batch = DVAEStage.eval_batch

    def eval_summary(self, n):
        usage = codebook_usage(torch.cat(self.val_codes), self.model_cfg.n_embed) if self.val_codes else {}
        self.val_codes = []
        return {"val_images": n, **{f"codebook_{k}": float(v) for k, v in usage.items()}}
