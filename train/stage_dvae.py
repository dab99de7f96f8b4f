"""The dVAE stage: the image tokenizer (discrete VAE) on image shards."""

from __future__ import annotations

import dataclasses

import torch

from dalle_ar.dvae import DiscreteVAE, DVAEConfig

from .stage import ImageTokenizerStage


class DVAEStage(ImageTokenizerStage):
    name = "dvae"
    summary = "the image tokenizer (discrete VAE) on image shards"
    model_config_cls = DVAEConfig

    @classmethod
    def resolve(cls, model_cfg, train_cfg, data_cfg):
        # The decoder-only phase wants a fresh LR schedule: restart it there unless train.restart_at says.
        hard = model_cfg.hard_codes_from_step
        if hard and not train_cfg.restart_at:
            train_cfg = dataclasses.replace(train_cfg, restart_at=hard)
        return super().resolve(model_cfg, train_cfg, data_cfg)

    def warnings(self):
        """The dVAE's own schedules count steps too: on a run shorter than them, say what will not happen."""
        m, steps = self.model_cfg, self.train_cfg.steps
        what = {"kl_warmup_steps": "the KL weight never reaches model.kl_weight",
                "temp_anneal_steps": "the Gumbel temperature never reaches model.temp_end",
                "hard_codes_from_step": "the decoder-only phase on hard codes never starts"}
        if m.quantizer == "fsq":  # no KL, no temperature
            what = {k: v for k, v in what.items() if k == "hard_codes_from_step"}
        value = {k: getattr(m, k) or 0 for k in what}  # hard_codes_from_step may be None (no such phase)
        longest = max(value.values())  # suggestions keep the proportions, the longest at 80% of the run
        return [f"WARNING: model.{k}={value[k]} >= train.steps={steps}: {text}; scale it to the run "
                f"(e.g. model.{k}={max(1, steps // 10, value[k] * steps * 4 // (5 * longest))})"
                for k, text in what.items() if value[k] >= steps > 0 and value[k]]

    def build_model(self):
        return DiscreteVAE(self.model_cfg)

    def loss_fn(self, model, batch, step):
        # Channels-last activations run faster on CPU; the weights stay contiguous for DeepSpeed's
        # broadcast and ZeRO's flat buffers.
        return model(batch["image"].contiguous(memory_format=torch.channels_last), step=step)
