"""Drive training runs from outside, like a cluster job: launch `dalle-ar train` (1 process) or the
`deepspeed` launcher on train/train_<stage>.py (N processes) in a session of its own, kill its whole
process group, resume it, and check what it left behind. Shared by tests/test_matrix.py and
bench/resume.py; everything goes through the CLI, the entry scripts and public model classes.
`free_port` and `stop_process` also serve tests/test_serve.py and bench/serve.py (`dalle-ar serve`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "train" / "configs"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


# ---- stages ---------------------------------------------------------------------------------------

def _load_dvae(d):
    from dalle_ar.dvae import DiscreteVAE
    return DiscreteVAE.from_pretrained(d)


def _load_dalle(d):
    from dalle_ar.dalle import DALLE
    return DALLE.from_pretrained(d)


def _load_clip(d):
    from transformers import CLIPModel
    return CLIPModel.from_pretrained(d)


def _load_vqgan(d):
    from dalle_ar.vqgan import VQGAN
    return VQGAN.from_pretrained(d)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One training stage as a user runs it. `cli`: the stage of `dalle-ar train` and of
    train/train_<cli>.py; `config`: its shipped shapes config; `overrides`: tiny sizes; `load`: the
    model's from_pretrained; `shards`: "raw" or "codes"; `needs`: data.* inputs ("tokenizer", "dvae").
    The sizes are tiny but keep one parameter above zero3.json's persistence threshold (10000), so
    ZeRO-3 really partitions."""

    cli: str
    config: str
    overrides: tuple
    load: Callable
    shards: str = "raw"
    needs: tuple = ()


STAGES = {
    "dvae": StageSpec("dvae", "dvae-shapes.json", (
        "model.image_size=32", "model.n_hid=16", "model.n_init=8", "model.vocab_size=32",
        "model.kl_warmup_steps=4", "model.temp_anneal_steps=4"), _load_dvae),
    "dalle_raw": StageSpec("dalle", "dalle-shapes.json", (
        "model.dim=64", "model.depth=2", "model.heads=2"), _load_dalle, "raw", ("tokenizer", "dvae")),
    "dalle_codes": StageSpec("dalle", "dalle-shapes.json", (
        "model.dim=64", "model.depth=2", "model.heads=2"), _load_dalle, "codes", ("tokenizer", "dvae")),
    "clip": StageSpec("clip", "clip-shapes.json", (
        "data.image_size=32", "model.embed_dim=16", "model.text_width=16", "model.text_layers=1",
        "model.text_heads=2", "model.vision_width=64", "model.vision_layers=1", "model.vision_heads=2"),
        _load_clip, "raw", ("tokenizer",)),
}
# Hook for the VQ tokenizer stage (issue 18): it joins the matrix and the bench as soon as its entry
# script and shapes config are in the tree. Tune its tiny sizes here (one parameter > 10000 elements).
if (REPO / "train" / "train_vqgan.py").is_file() and (CONFIGS / "vqgan-shapes.json").is_file():
    STAGES["vqgan"] = StageSpec("vqgan", "vqgan-shapes.json", ("model.image_size=32",), _load_vqgan)
# The VQGAN with its patch-GAN discriminator (a second engine, checkpointed in <tag>/aux): on from step 2, so
# the kill after step 3 and the resume from step 2 redo a GAN step (its conv 32 -> 64 (4x4) > 10000 elements).
if (CONFIGS / "vqgan-shapes-gan.json").is_file():
    STAGES["vqgan_gan"] = StageSpec("vqgan", "vqgan-shapes-gan.json", (
        "model.image_size=32", "model.disc_start=2", "model.disc_ndf=16", "model.disc_layers=2"), _load_vqgan)

# Every run: every step logged, every checkpoint kept (the data-position trail), the shipped loader
# workers on (so a group signal reaches them too), short warm-up and sample grids.
COMMON = ("train.log_every=1", "train.keep_last=1000", "train.warmup=1", "data.sample_count=2",
          "data.num_workers=1", "data.shuffle_buffer=50")


def cli(*argv) -> None:
    from dalle_ar.cli import main
    rc = main([str(a) for a in argv])
    assert rc == 0, (argv, rc)


def make_data(root: Path, shards: int, shard_size: int) -> dict:
    """Shapes shards, code shards, a BPE tokenizer and a random tiny dVAE (32 px, 4x4 codes), written by
    the package's own writers. -> {"raw", "codes", "val", "tokenizer", "dvae"}."""
    from dalle_ar.dvae import DiscreteVAE, DVAEConfig

    root = Path(root)
    cli("data", "shapes", "--out", root / "raw", "--train-size", shards * shard_size, "--val-size", 8,
        "--shard-size", shard_size, "--seed", 3)
    train = sorted(str(p) for p in (root / "raw").glob("*train*.tar"))
    val = sorted(str(p) for p in (root / "raw").glob("*val*.tar"))
    assert len(train) == shards and val
    cli("tokenizer", "train", "--shards", *train, "--vocab-size", 96, "--min-frequency", 1, "--out", root / "tok")
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32)).save_pretrained(root / "dvae")
    cli("encode", "--dvae", root / "dvae", "--shards", ",".join(train), "--out", root / "codes",
        "--shard-size", shard_size, "--batch-size", shard_size)
    codes = sorted(str(p) for p in (root / "codes").glob("*.tar"))
    assert len(codes) == shards
    return {"raw": train, "codes": codes, "val": val, "tokenizer": str(root / "tok"), "dvae": str(root / "dvae")}


def run_env(extensions_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir))
    # One thread a process: 2 ranks x 2 OpenMP threads on 2 shared cores spin-wait (measured 10-30x slower).
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


# ---- launching and killing ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server the way a user does (Ctrl-C: SIGINT), and kill it if it is still up after `timeout` s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def train_cmd(spec: StageSpec, data: dict, out: Path, zero: int, nproc: int, *, steps: int, save_every: int,
              batch: int, extra=(), val: bool = True) -> list[str]:
    if nproc == 1:
        head = [str(BIN / "dalle-ar"), "train", spec.cli]
    else:
        head = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                str(REPO / "train" / f"train_{spec.cli}.py")]
    return [*head, "--train-shards", ",".join(data[spec.shards]),
            *(["--val-shards", ",".join(data["val"])] if val else []),
            "--out", str(out), "--config", str(CONFIGS / spec.config),
            "--deepspeed-config", str(CONFIGS / f"zero{zero}.json"),
            "--steps", str(steps), "--save-every", str(save_every), "--batch-size", str(batch),
            *spec.overrides, *COMMON, *(f"data.{k}={data[k]}" for k in spec.needs), *extra]


def start(cmd, env, log: Path) -> subprocess.Popen:
    """In a session of its own, like a batch job: its process group is everything it started."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL, timeout=60) -> None:
    """Signal the whole group, wait for the leader, then for every other member (ranks, loader workers)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.time() + 30
    while group_members(proc.pid):
        if time.time() > deadline:
            raise AssertionError(f"processes of group {proc.pid} survived: {group_members(proc.pid)}")
        time.sleep(0.1)


def wait_for(proc, log: Path, ready: Callable[[], bool], what: str, timeout: float, poll=0.05) -> None:
    """Poll `ready`; AssertionError (with the log's tail) if the run ends or the time runs out first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            ended = proc.poll() is not None
            if group_members(proc.pid):
                kill_group(proc)
            raise AssertionError(f"{'the run ended (rc %s)' % proc.returncode if ended else 'timed out'} "
                                 f"before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def run_to_end(cmd, env, log: Path, timeout: float) -> str:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              start_new_session=True)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


# ---- reading a run --------------------------------------------------------------------------------

STEP_RE = re.compile(r"^\[engine\] step (\d+)/(\d+) (.*?) lr (\S+)(?: grad_norm (\S+))?.* samples/s epoch (\d+)",
                     re.M)
RESUMED_RE = re.compile(r"^\[engine\] resumed from (\S+): step (\d+)", re.M)
FRESH_RE = re.compile(r"^\[engine\] resume: no complete checkpoint", re.M)


def step_lines(text: str) -> dict[int, tuple]:
    """{step: (loss parts, lr, grad norm, epoch)} from one launch's log (train.log_every=1)."""
    found = {}
    for m in STEP_RE.finditer(text):
        step = int(m.group(1))
        if step in found:
            raise AssertionError(f"step {step} logged twice in one launch")
        found[step] = (m.group(3), m.group(4), m.group(5), m.group(6))
    return found


def resumed_from(text: str):
    """The step a --resume launch continued from: int, 0 if it found no checkpoint, None if no such line."""
    m = RESUMED_RE.search(text)
    return int(m.group(2)) if m else 0 if FRESH_RE.search(text) else None


def tags(run: Path) -> list[tuple[int, bool]]:
    """(step, complete) of every checkpoint tag dir."""
    ck = Path(run) / "checkpoints"
    return sorted((int(p.name[4:]), (p / "complete").is_file()) for p in ck.glob("step*") if p.is_dir()) \
        if ck.is_dir() else []


def complete_tags(run: Path) -> list[int]:
    return [s for s, ok in tags(run) if ok]


def logged(log: Path, step: int) -> Callable[[], bool]:
    pat = re.compile(rf"^\[engine\] step {step}/", re.M)
    return lambda: log.is_file() and bool(pat.search(log.read_text()))


# ---- checks ---------------------------------------------------------------------------------------

def check_continues(before: str, after: str, newest: int, steps: int) -> list[int]:
    """A launch killed after logging steps `before` and the --resume launch after it: the resume starts
    at `newest` (the newest complete checkpoint the kill left), logs newest+1.. up to where it ended,
    each step once and none skipped; steps both launches ran log the same loss, LR, grad norm and epoch
    (same data, same state). Returns the redone steps."""
    first, second = step_lines(before), step_lines(after)
    start = resumed_from(after)
    assert start == newest, f"resumed from {start}, the newest complete checkpoint is {newest}"
    if second:
        assert sorted(second) == list(range(start + 1, max(second) + 1)), sorted(second)
        assert max(second) <= steps
    redone = sorted(set(first) & set(second))
    for s in redone:
        assert first[s] == second[s], (s, first[s], second[s])
    return redone


def check_data_position(run: Path, nproc: int, samples: int, batch: int) -> list[int]:
    """At every complete tag on every rank: epoch * P + batch_in_epoch == step, where P = the batches a
    rank gets an epoch (its share of `samples`); samples_seen == step * batch * world."""
    per_rank = samples // nproc // batch
    done = complete_tags(run)
    for step in done:
        tag = Path(run) / "checkpoints" / f"step{step:08d}"
        state = json.loads((tag / "trainer_state.json").read_text())
        assert state["step"] == step and state["world_size"] == nproc, (step, state["world_size"])
        assert state["samples_seen"] == step * batch * nproc, (step, state["samples_seen"])
        for rank in range(nproc):
            pos = json.loads((tag / f"rank{rank}.json").read_text())
            assert pos["epoch"] * per_rank + pos["batch_in_epoch"] == step, (step, rank, pos)
    return done


def same_tensors(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def check_export(spec: StageSpec, export: Path, consolidated: Path = None) -> dict:
    """`export` loads with the model's from_pretrained, holds finite weights, and (given) equals the
    `dalle-ar export` of the run in `consolidated`. Returns its tensors."""
    weights = load_file(str(Path(export) / "model.safetensors"))
    if consolidated is not None:
        assert same_tensors(weights, load_file(str(Path(consolidated) / "model.safetensors"))), \
            f"{export} differs from the consolidated checkpoint {consolidated}"
    model_sd = spec.load(export).state_dict()
    for k, v in weights.items():
        assert torch.equal(model_sd[k].reshape(v.shape), v), k
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    return weights


def zero3_partitions(weights: dict) -> bool:
    """Some tensor is larger than the shipped ZeRO-3 config's persistence threshold (so it is sharded)."""
    ds = json.loads((CONFIGS / "zero3.json").read_text())
    return max(v.numel() for v in weights.values()) > ds["zero_optimization"]["stage3_param_persistence_threshold"]
