"""The CLIP stage: the reranker (a small CLIP) on image shards, with a trained tokenizer."""

from __future__ import annotations

from dalle_ar.clip import SmallCLIPConfig, build_small_clip, clip_inputs, clip_loss, retrieval_accuracy
from dalle_ar.tokenizer import TextTokenizer

from .stage import Stage
from .stage_config import CLIPDataConfig


class CLIPStage(Stage):
    name = "clip"
    summary = "the reranker (a small CLIP) on image shards, with a trained tokenizer"
    needs = {"data.tokenizer": "a trained tokenizer directory (dalle-ar tokenizer train --out)"}
    model_config_cls = SmallCLIPConfig
    data_config_cls = CLIPDataConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        cls.check_needs(data_cfg)
        return model_cfg, train_cfg, data_cfg

    def build_model(self):
        tokenizer = TextTokenizer.from_pretrained(self.data.tokenizer)
        model, self.clip_tokenizer, self.processor = build_small_clip(
            tokenizer, self.model_cfg, image_size=self.data.image_size, text_len=self.data.text_len)
        return model

    def inputs(self, images, captions):
        return clip_inputs(images, captions, self.clip_tokenizer, self.processor, text_len=self.data.text_len)

    def loss_fn(self, model, batch, step):
        return clip_loss(model, **self.inputs(batch["image"], batch["caption"]))

    def finish_export(self, export_dir):
        self.clip_tokenizer.save_pretrained(export_dir)
        self.processor.save_pretrained(export_dir)

    def eval_batch(self, model, batch):
        inputs = self.inputs(batch["image"].to(next(model.parameters()).device), batch["caption"])
        return {"retrieval_top1": retrieval_accuracy(model, **inputs)}, len(batch["caption"])

    def eval_summary(self, n):
        return {"val_batch": self.train_cfg.batch_size, "val_samples": n}
