"""The one training loop: every stage (dVAE, prior, CLIP) trains through `train()` on a DeepSpeed engine.

    summary = train(model, loss_fn, make_batches, TrainConfig(...), out_dir)

The contract for stage authors:

- `model`: an nn.Module with `.save_pretrained(dir, state_dict=None)` (the export writes
  `config.json` + `model.safetensors` through it).
- `loss_fn(model, batch, step) -> (loss, parts)`. `model` is the DeepSpeed engine: call it like the
  module (`model(x, ...)` runs `module.forward` through the engine); attributes and methods pass
  through to the module (`model.config`, `model.encode`). The loss must come from calling
  `model(...)`: under ZeRO the engine's forward installs the backward hooks ZeRO needs (a forward
  through `engine.module(...)` gives wrong ZeRO-3 updates with gradient accumulation).
  `batch` is what `make_batches` yielded with every tensor moved to the engine's device (floating
  tensors cast to bf16/fp16 under `precision=bf16|fp16`). `parts` are scalars to log.
- `make_batches(epoch) -> iterable`: one pass over this rank's data (rank splitting is the
  loader's job); when it ends the engine calls `make_batches(epoch + 1)`. One batch = one
  micro-batch; `cfg.grad_accum` of them make one optimizer step.
- `hooks` (dict or object, every entry optional), called on EVERY rank (ZeRO-3 forwards need all
  ranks); write files only where `writer is not None` (rank 0):
    on_start(step)                     once the engine has accepted the run (fresh, or its checkpoint
                                       loaded), before the first step: a refused run writes nothing
    on_step(step, parts)               after each optimizer step, parts as floats (this rank's mean)
    on_checkpoint(step, model, writer) after each complete checkpoint; `model` is the module (eval
                                       mode, no grad, full weights gathered under ZeRO-3), `writer`
                                       the TensorBoard SummaryWriter or None
    on_eval(step, model, writer) -> dict   every cfg.eval_every steps (and at the last step): validation
                                       metrics {name: number}, equal on every rank (read the same val
                                       batches on all ranks); logged as val/<name> (a `val_` prefix is
                                       dropped) and as one line; `model` as for on_checkpoint
    skipped_counts() -> dict           the loader's skip counters; summed over ranks and logged
- `aux` (optional): an `Auxiliary(model, loss_fn, active, name)`, a second model with its own optimizer (a
  GAN's discriminator) on a second DeepSpeed engine built from the same DeepSpeed config and the same LR
  schedule. With it, the main loss is called `loss_fn(model, batch, step, aux)` where `aux` is the
  auxiliary's engine, or None at steps where `active(step)` is false; while it runs (and its backward),
  the auxiliary's parameters have requires_grad off, so the main loss gives it no gradient (call its
  module, `aux.module(x)`, for that: its engine's forward would make its outputs differentiable only by
  its own backward). Then `aux.loss_fn(aux, batch, step) -> (loss, parts)` runs on the same micro-batch
  (the main loss_fn may leave detached tensors in `batch` for it) and is back-propagated by its engine;
  the auxiliary steps after the main optimizer, only at active steps. Its loss is logged as
  `<name>_loss` with its parts; it is checkpointed into each tag's `aux/` folder and restored on resume
  (a resume without it, or with another shape, is refused); the export is the main model's only.
- `out_dir` receives `checkpoints/step00001000/` (DeepSpeed checkpoints; a tag counts only once it
  holds the `complete` marker), `tb/` (TensorBoard), `export/` (config.json + model.safetensors, fp32).

A warm-up at least as long as the run (or a restart phase) is shortened to a tenth of it, with a
warning (`fit_to_run`): short runs reach the configured LR.

Non-finite losses are caught before backward on every rank alike: the micro-batch is dropped (with
grad_accum=1 the step is skipped) and counted; `max_nonfinite` in a row raise RuntimeError. Under fp16,
DeepSpeed's dynamic loss scaling skips steps whose gradients overflow; those count as skipped_steps.
SIGTERM/SIGINT finish the current step, checkpoint and return with summary["interrupted"] = True.

The package, one module per concern (stage code imports from `dalle_ar.engine` only):

    config.py            TrainConfig, lr_at (the schedule), fit_to_run (short runs), apply_overrides (`key=value`)
    deepspeed_config.py  load_ds_config, resolve_ds_config (the DeepSpeed JSON agrees with TrainConfig)
    dist.py              init_distributed, is_rank0, and the collectives the loop agrees with
    optim.py             param_groups: the one weight-decay rule
    checkpoint.py        RunState, tags + `complete` markers, RNG state, export_checkpoint
    loop.py              train(), its Meter (logging) and the micro-batch stepper
"""

from .checkpoint import (COMPLETE, FP32_FILE, STATE_FILE, TAG_RE, RunState, export_checkpoint,
                         latest_checkpoint, seed_everything, weights_only_loads)
from .config import PRECISIONS, SCHEDULES, TrainConfig, apply_overrides, fit_to_run, lr_at
from .deepspeed_config import CONFIG_DIR, load_ds_config, resolve_ds_config
from .dist import free_port, init_distributed, is_rank0
from .loop import Auxiliary, Meter, train
from .optim import param_groups

__all__ = ["TrainConfig", "train", "Auxiliary", "lr_at", "fit_to_run", "apply_overrides", "load_ds_config", "resolve_ds_config", "CONFIG_DIR",
           "init_distributed", "is_rank0", "free_port", "seed_everything", "param_groups", "RunState", "Meter",
           "latest_checkpoint", "export_checkpoint", "TAG_RE", "COMPLETE", "STATE_FILE", "FP32_FILE",
           "PRECISIONS", "SCHEDULES", "weights_only_loads"]
