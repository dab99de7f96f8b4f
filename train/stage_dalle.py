"""The DALL-E stage: the prior (transformer) on image or code shards, with a trained tokenizer and image tokenizer."""

from __future__ import annotations

import dataclasses

import torch

from dalle_ar.dalle import DALLE, DALLEConfig
from dalle_ar.data import shards_have_codes
from dalle_ar.image_tokenizer import load_image_tokenizer, load_image_tokenizer_config
from dalle_ar.tokenizer import TextTokenizer

from .stage import Stage, save_grid
from .stage_config import DALLEDataConfig


class DALLEStage(Stage):
    name = "dalle"
    summary = "the prior (transformer) on image or code shards, with a trained tokenizer and dVAE"
    needs = {"data.tokenizer": "a trained tokenizer directory (dalle-ar tokenizer train --out)",
             "data.dvae": "a trained image tokenizer directory: a dVAE or a VQGAN (RUN/export of `train dvae` / `train vqgan`, or `convert openai-dvae` / `convert taming-vqgan`)"}
    model_config_cls = DALLEConfig
    data_config_cls = DALLEDataConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        """The model's vocabularies and grid follow the tokenizer and the image tokenizer unless set."""
        cls.check_needs(data_cfg)
        text_vocab = TextTokenizer.from_pretrained(data_cfg.tokenizer).vocab_size
        dvae = load_image_tokenizer_config(data_cfg.dvae)
        fill = {k: v for k, v in (("text_vocab_size", text_vocab), ("image_vocab_size", dvae.vocab_size),
                                  ("image_grid", dvae.grid_size)) if not getattr(model_cfg, k)}
        model_cfg = dataclasses.replace(model_cfg, **fill)
        if model_cfg.image_vocab_size != dvae.vocab_size or model_cfg.image_grid != dvae.grid_size:
            raise ValueError("model.image_vocab_size / model.image_grid disagree with the image tokenizer")
        if text_vocab > model_cfg.text_vocab_size:
            raise ValueError(f"model.text_vocab_size={model_cfg.text_vocab_size} < tokenizer vocab {text_vocab}")
        return model_cfg, train_cfg, dataclasses.replace(data_cfg, image_size=dvae.image_size)

    def build_model(self):
        self.tokenizer = TextTokenizer.from_pretrained(self.data.tokenizer)
        self.dvae = load_image_tokenizer(self.data.dvae).eval().requires_grad_(False)
        self.codes = shards_have_codes(self.train_shards)  # pre-encoded by `dalle-ar encode`
        return DALLE(self.model_cfg)

    def loader_kwargs(self):
        return {"decode_images": not self.codes,
                "text_encoder": self.tokenizer.encoder(self.model_cfg.text_len, dropout=self.data.bpe_dropout)}

    def batch_codes(self, batch, device):
        if "codes" in batch:
            return batch["codes"].to(device)
        self.dvae.to(device)
        with torch.no_grad():
            return self.dvae.encode(batch["image"].to(device).float())

    def loss_fn(self, model, batch, step):
        return model(batch["text"], self.batch_codes(batch, batch["text"].device))

    def prompts(self):
        if self.data.sample_prompts:
            return list(self.data.sample_prompts)
        return list(self.fixed_batch(self.data.sample_count)["caption"])

    @torch.no_grad()
    def on_checkpoint(self, step, model, writer):
        prompts = self.prompts()
        dev = next(model.parameters()).device
        text = self.tokenizer.encode(prompts, length=self.model_cfg.text_len).to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        codes = model.generate(text.repeat_interleave(4, 0), generator=g)
        self.dvae.to(dev)
        images = self.dvae.decode(codes).float().cpu()
        save_grid(images, 4, self.out / "samples" / f"step{step:08d}.png", writer, "dalle/samples", step,
                  captions=prompts)

    def eval_loader_kwargs(self):
        return {"decode_images": not shards_have_codes(self.val_shards)}

    def eval_batch(self, model, batch):
        dev = next(model.parameters()).device
        text = batch["text"].to(dev)
        _, parts = model(text, self.batch_codes(batch, dev))
        return {k: parts[k] for k in ("loss_text", "loss_image")}, text.shape[0]

    def eval_summary(self, n):
        return {"val_samples": n}
