"""The shared DeepSpeed loop on CPU (gloo): ZeRO 0/2/3, two processes, kill -9 / SIGTERM + resume,
non-finite losses, interrupted checkpoints, overrides and exports. Real engines, real files."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle_ar import engine
from dalle_ar.engine import TrainConfig, apply_overrides, export_checkpoint, latest_checkpoint, lr_at, train
import engine_toy
from engine_toy import ToyData, ToyLoss, ToyMLP, make_model

TOY = Path(__file__).with_name("engine_toy.py")
from run_harness import LAUNCH_VARS  # noqa: E402  (one list of the launcher's variables)


def toy_cfg(**kw):
    base = dict(steps=20, batch_size=16, lr=1e-2, min_lr=1e-3, warmup=2, save_every=5, keep_last=2, log_every=5,
                progress=False, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def run_toy(out, loss_fn=None, resume=False, **kw):
    model, loss_fn = make_model(), loss_fn or ToyLoss()
    summary = train(model, loss_fn, ToyData(16), toy_cfg(**kw), out, resume=resume)
    return summary, model, loss_fn


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


def assert_same(a: dict, b: dict, exact=True):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == torch.float32, k
        if exact:
            assert torch.equal(a[k], b[k].to(a[k].dtype)), k
        else:
            torch.testing.assert_close(a[k], b[k].to(a[k].dtype), rtol=1e-5, atol=1e-6)


# ---- in-process runs ------------------------------------------------------------------------------

def test_zero_0_2_3_train_and_export(tmp_path):
    results = {}
    for zero in (0, 2, 3):
        summary, model, _ = run_toy(tmp_path / f"z{zero}", zero_stage=zero, steps=24)
        assert summary["steps"] == 24 and summary["zero_stage"] == zero and not summary["interrupted"]
        assert summary["final_loss"] < 0.6 * summary["first_loss"], summary
        exported = weights(summary["export_dir"])
        # the export equals the trained module (ZeRO-3: gathered back into it) ...
        assert_same(exported, model.state_dict())
        # ... and what the checkpoint holds (ZeRO-2/3 through zero_to_fp32), via a fresh model
        again = export_checkpoint(tmp_path / f"z{zero}", make_model(seed=5), tmp_path / f"again{zero}")
        assert_same(weights(again), exported)
        assert_same(ToyMLP.from_pretrained(again).state_dict(), exported)
        results[zero] = exported
    # the three stages are the same optimisation
    assert_same(results[2], results[0], exact=False)
    assert_same(results[3], results[0], exact=False)


def reference_run(steps, cfg, data, nan_ids=(), grad_accum=1):
    """The loop by hand in plain torch: AdamW groups, warm-up + cosine, clipping, dropped micro-batches."""
    model = make_model()
    groups = engine.param_groups(model, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    it = (b for e in range(100) for b in data(e))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for _ in range(grad_accum):
            b = next(it)
            if int(b["id"][0]) not in nan_ids:
                (model(b["x"], b["y"])[0] / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def test_grad_accum_with_a_nan_micro_batch_matches_plain_torch(tmp_path):
    loss_fn = ToyLoss(nan_ids={3})  # step 1 has micro-batches 2 and 3: only 3 is dropped
    summary, model, _ = run_toy(tmp_path / "run", loss_fn, zero_stage=2, steps=6, grad_accum=2, grad_clip=0.5)
    assert summary["nonfinite"] == 1 and summary["skipped_steps"] == 0 and summary["steps"] == 6
    assert loss_fn.ids == list(range(7)) + [1000, 1001, 1002, 1003, 1004]
    cfg = toy_cfg(steps=6, grad_accum=2, grad_clip=0.5)
    assert_same(reference_run(6, cfg, ToyData(16), nan_ids={3}, grad_accum=2), model.state_dict(), exact=False)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    summary, model, loss_fn = run_toy(tmp_path / "nan", ToyLoss(nan_steps={3, 5}), zero_stage=0, steps=10)
    assert summary["steps"] == 10 and summary["nonfinite"] == 2 and summary["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert math.isfinite(summary["final_loss"])
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses"):
        run_toy(tmp_path / "nan3", ToyLoss(nan_steps={2, 3, 4, 5}), zero_stage=3, steps=10, max_nonfinite=3)


def test_interrupted_checkpoint_is_not_latest(tmp_path):
    run = tmp_path / "run"
    run_toy(run, zero_stage=2, steps=6, save_every=3)
    ckpt = run / "checkpoints"
    # a write killed half-way: files but no marker, and DeepSpeed's `latest` already pointing at it
    (ckpt / "step00000009").mkdir()
    (ckpt / "step00000009" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (ckpt / "latest").write_text("step00000009")
    assert latest_checkpoint(ckpt) == "step00000006"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_toy(run, zero_stage=2, steps=9)  # a fresh run must not mix with an old one
    summary, _, loss_fn = run_toy(run, resume=True, zero_stage=2, steps=9, save_every=3)
    assert summary["start_step"] == 6 and summary["steps"] == 9
    assert loss_fn.ids == [6, 1000, 1001]  # 6 batches done: epoch 0 (7 batches) resumes at its 7th
    assert latest_checkpoint(ckpt) == "step00000009" and (ckpt / "step00000009" / "complete").is_file()
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000006", "step00000009"]  # keep_last=2
    fresh, _, _ = run_toy(tmp_path / "empty", resume=True, steps=2)  # nothing to resume: starts fresh
    assert fresh["start_step"] == 0 and fresh["steps"] == 2


def test_a_short_run_shortens_a_longer_warmup_and_says_so(tmp_path, capsys):
    """Issue 22, item 3: warm-up >= steps never reaches the LR (the dVAE default 100 on a 20-step run):
    the engine shortens it to a tenth of the run (or of the shortest restart phase) and warns; longer
    runs are untouched."""
    fitted, warnings = engine.fit_to_run(toy_cfg(steps=20, warmup=100, lr=1.0, min_lr=0.1))
    assert fitted.warmup == 2 and "train.warmup=100 >= the run's 20 steps" in warnings[0]
    assert max(lr_at(s, fitted) for s in range(20)) == 1.0  # the configured LR is reached
    fitted, warnings = engine.fit_to_run(toy_cfg(steps=100, warmup=30, restart_at=80))
    assert fitted.warmup == 2 and "restart_at" in warnings[0]  # the 20-step decoder-only phase
    same = toy_cfg(steps=100, warmup=10)
    assert engine.fit_to_run(same) == (same, [])
    capsys.readouterr()
    summary, _, _ = run_toy(tmp_path / "short", steps=4, warmup=100)
    assert summary["steps"] == 4
    assert "[engine] WARNING: train.warmup=100 >= the run's 4 steps" in capsys.readouterr().out


def test_lr_schedules():
    cos = toy_cfg(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cos) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lr_at(100, cos) == pytest.approx(0.1)
    assert lr_at(55, cos) == pytest.approx(0.55)  # half-way through the cosine: mid-point of lr and min_lr
    halving = toy_cfg(steps=100, warmup=10, lr=1.0, min_lr=0.2, schedule="halving", halve_every=20)
    assert [lr_at(s, halving) for s in (10, 29, 30, 49, 50, 90)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.2]
    assert lr_at(50, toy_cfg(warmup=10, schedule="constant", lr=0.3)) == 0.3
    with pytest.raises(ValueError, match="halve_every"):
        toy_cfg(schedule="halving")
    # A restart runs the whole schedule again over the remaining steps; one at or after the end never comes.
    restart = toy_cfg(steps=100, warmup=10, lr=1.0, min_lr=0.1, restart_at=60)
    first = toy_cfg(steps=60, warmup=10, lr=1.0, min_lr=0.1)
    again = toy_cfg(steps=40, warmup=10, lr=1.0, min_lr=0.1)
    assert [lr_at(s, restart) for s in range(100)] == pytest.approx(
        [lr_at(s, first) for s in range(60)] + [lr_at(s, again) for s in range(40)])
    assert lr_at(69, restart) == 1.0 and lr_at(100, restart) == pytest.approx(0.1)
    assert [lr_at(s, toy_cfg(steps=100, warmup=10, restart_at=100)) for s in range(100)] == \
        [lr_at(s, toy_cfg(steps=100, warmup=10)) for s in range(100)]
    with pytest.raises(ValueError, match="restart_at"):
        toy_cfg(restart_at=-1)


def test_tensorboard_log_lines_hooks_and_keep_last(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []

    def on_checkpoint(step, model, writer):
        assert not model.training and not torch.is_grad_enabled()
        seen.append(step)
        writer.add_image("toy/grid", torch.rand(3, 4, 4), step)

    hooks = {"on_checkpoint": on_checkpoint, "skipped_counts": lambda: {"bad_image": 2}}
    out, cfg = tmp_path / "tb_run", toy_cfg(steps=6, save_every=2, keep_last=2, log_every=3, tensorboard=True)
    summary = train(make_model(), ToyLoss(), ToyData(16), cfg, out, hooks=hooks)
    assert seen == [2, 4, 6] and summary["skipped_samples"] == {"bad_image": 2}
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000004", "step00000006"]
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[engine] step ")]
    assert [l.split()[2] for l in lines] == ["3/6", "6/6"]  # stdout is no terminal: one line per log_every
    assert all(" loss " in l and " lr " in l and "samples/s" in l and " eta " in l for l in lines)
    events = EventAccumulator(str(out / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mse", "train/lr", "train/grad_norm", "train/samples_per_s", "train/nonfinite",
            "train/skipped_steps", "data/skipped/bad_image"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([lr_at(2, cfg), lr_at(5, cfg)])
    assert [e.step for e in events.Images("toy/grid")] == [2, 4, 6]


def test_bf16_trains_and_exports_the_fp32_master_weights(tmp_path):
    for zero in (0, 2):
        summary, model, _ = run_toy(tmp_path / f"z{zero}", zero_stage=zero, steps=6, precision="bf16", save_every=0)
        assert summary["precision"] == "bf16" and summary["final_loss"] < summary["first_loss"]
        assert all(v.dtype == torch.bfloat16 for v in model.state_dict().values())  # the module trained in bf16
        exported = weights(summary["export_dir"])
        assert any(not torch.equal(v, v.bfloat16().float()) for v in exported.values())  # fp32, not bf16 copies
        torch.testing.assert_close({k: v.bfloat16() for k, v in exported.items()}, model.state_dict())
        assert_same(weights(export_checkpoint(tmp_path / f"z{zero}", make_model(), tmp_path / f"again{zero}")),
                    exported)


# ---- overrides and the DeepSpeed config -----------------------------------------------------------

def test_apply_overrides_coerces_and_rejects_unknown_keys():
    cfg = apply_overrides(TrainConfig(), ["lr=1", "steps=50", "betas=[0.9, 0.95]", "precision=bf16", "progress=false"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.steps == 50 and cfg.betas == (0.9, 0.95)
    assert cfg.precision == "bf16" and cfg.progress is False
    for bad, word in (("nope=1", "'nope'"), ("steps=abc", "'steps'"), ("progress=2", "'progress'"),
                      ("lr", "key=value"), ("precision=fp8", "precision"), ("steps=2.5", "'steps'")):
        with pytest.raises(ValueError, match=word):
            apply_overrides(TrainConfig(), [bad])
    ds = {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}
    assert apply_overrides(ds, ["zero_optimization.stage=3"])["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage"] == 0  # input untouched
    with pytest.raises(ValueError, match="zero_optimization.stagee"):
        apply_overrides(ds, ["zero_optimization.stagee=3"])
    loaded = engine.load_ds_config(ds, ["zero_optimization.overlap_comm=true"])  # DeepSpeed keys may be added
    assert loaded["zero_optimization"] == {"stage": 0, "overlap_comm": True}


def test_ds_config_follows_train_config():
    cfg, ds = engine.resolve_ds_config(TrainConfig(batch_size=4, grad_accum=2, grad_clip=1.0, precision="bf16"))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 0 and ds["managed_gradient_accumulation"] is False
    # the packaged ZeRO-3 file alone selects ZeRO-3 ...
    cfg, ds = engine.resolve_ds_config(TrainConfig(), engine.load_ds_config(engine.CONFIG_DIR / "zero3.json"))
    assert cfg.zero_stage == 3 and ds["zero_optimization"]["stage"] == 3 and ds["fp16"]["enabled"] is False
    # ... but two explicit, different choices are an error naming both
    with pytest.raises(ValueError, match=r"zero_optimization.stage=3 but train.zero_stage=2"):
        engine.resolve_ds_config(TrainConfig(zero_stage=2), {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="precision"):
        engine.resolve_ds_config(TrainConfig(precision="fp16"), {"bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="scheduler"):
        engine.resolve_ds_config(TrainConfig(), {"scheduler": {"type": "WarmupLR"}})


# ---- subprocesses: launcher, kill -9, SIGTERM -----------------------------------------------------

@pytest.fixture(scope="session")
def toy_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.getbasetemp() / "torch_extensions")
    env["PYTHONWARNINGS"] = "ignore"
    # The uninterrupted reference runs in this process: the subprocesses use its thread count, since
    # fp32 sums (and so the bitwise comparisons) depend on it, and earlier in-process CLI runs may have
    # set it by the threads policy (dalle_ar.threads).
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def toy_cmd(out, *args):
    return [sys.executable, str(TOY), "--out", str(out), *map(str, args)]


def toy_log(out, name="run", rank=0):
    return json.loads((Path(out) / f"toy_{name}_rank{rank}.json").read_text())


def run_ok(cmd, env, timeout=120):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


RESUME_ARGS = ("--steps", 12, "--save-every", 3, "--zero", 2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    engine_toy.main(["--out", str(out), *map(str, RESUME_ARGS)])  # in this process: one interpreter start less
    return out


def start_and_wait_for_checkpoint(out, env):
    proc = subprocess.Popen(toy_cmd(out, *RESUME_ARGS, "--sleep", 0.4), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint in 90 s"
        time.sleep(0.1)
    return proc


def check_resumed(out, uninterrupted):
    ref = toy_log(uninterrupted)
    resumed = toy_log(out, "resumed")
    start = resumed["summary"]["start_step"]
    assert 0 < start < 12 and resumed["summary"]["steps"] == ref["summary"]["steps"] == 12
    assert resumed["steps"] == list(range(start, 12))  # the step counter continues
    assert resumed["ids"] == ref["ids"][start:]      # and so does the data, batch for batch
    assert_same(weights(out / "export"), weights(uninterrupted / "export"))  # bitwise: a deterministic toy


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, toy_env, uninterrupted):
    out = tmp_path / "killed"
    proc = start_and_wait_for_checkpoint(out, toy_env)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "export").exists()
    run_ok(toy_cmd(out, *RESUME_ARGS, "--resume", "--name", "resumed"), toy_env)
    check_resumed(out, uninterrupted)


def test_sigterm_checkpoints_and_exits_0_then_resumes(tmp_path, toy_env, uninterrupted):
    out = tmp_path / "terminated"
    proc = start_and_wait_for_checkpoint(out, toy_env)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = toy_log(out)
    stopped = log["summary"]["steps"]
    assert log["summary"]["interrupted"] is True and log["summary"]["export_dir"] is None and stopped < 12
    assert latest_checkpoint(out / "checkpoints") == f"step{stopped:08d}"  # checkpoint of the last step done
    run_ok(toy_cmd(out, *RESUME_ARGS, "--resume", "--name", "resumed"), toy_env)
    assert toy_log(out, "resumed")["summary"]["start_step"] == stopped
    check_resumed(out, uninterrupted)


@pytest.mark.slow  # ~40 s: two fresh interpreters importing DeepSpeed
def test_two_processes_through_the_deepspeed_launcher(tmp_path, toy_env):
    out = tmp_path / "two"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(engine.free_port()), str(TOY),
           "--out", str(out), "--steps", "8", "--save-every", "4", "--zero", "2"]
    run_ok(cmd, toy_env, timeout=180)
    logs = [toy_log(out, rank=r) for r in (0, 1)]
    for r, log in enumerate(logs):
        assert log["rank"] == r and log["world"] == 2 and log["steps"] == list(range(8))
        assert log["summary"]["steps"] == 8 and log["summary"]["world_size"] == 2
    assert logs[0]["summary"]["samples_seen"] == 8 * 2 * 16
    ckpt = out / "checkpoints" / "step00000008"
    assert (ckpt / "complete").is_file() and (ckpt / "rank1.json").is_file()
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # optimizer state split over 2 ranks
    exported = weights(out / "export")
    # the export reloads to the same weights, equal to the consolidated ZeRO-2 checkpoint
    assert_same(ToyMLP.from_pretrained(out / "export").state_dict(), exported)
    assert_same(weights(export_checkpoint(out, make_model(seed=3), tmp_path / "again")), exported)
