"""Issue 16: where a cluster differs from a laptop. One regression test per finding, each through the
real CLI, real DeepSpeed engines (gloo on CPU, also 2 processes through the `deepspeed` launcher) and
real WebDataset tars."""

import json
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
from dalle_ar.cli import main as cli_main
from dalle_ar.train import config_path
from test_stages import TINY, run  # noqa: F401  (tiny model overrides; shards + tokenizer + dVAE fixture)

from run_harness import LAUNCH_VARS  # noqa: E402  (one list of the launcher's variables)
COMMON = ["train.warmup=1", "data.sample_count=2", "data.num_workers=0"]
# ZeRO-3 keeps parameters under this many elements whole on every rank; 0 partitions all of them,
# so tiny models behave like big ones.
PARTITION_ALL = "ds.zero_optimization.stage3_param_persistence_threshold=0"


@pytest.fixture(scope="module")
def data(run):
    """Real shapes shards (3 train, 1 val, 16 samples each), a tokenizer and a tiny trained dVAE export
    (test_stages' `run`)."""
    root = run["root"]
    return {**run, "tokenizer": root / "tokenizer", "dvae": root / "dvae" / "export"}


def stage_args(data, stage, out, *extra, config=True):
    """`dalle-ar train STAGE` arguments for a tiny run of `stage` into `out`."""
    args = ["train", stage, "--train-shards", ",".join(data["train"]), "--out", str(out),
            "--batch-size", "8", *TINY[stage], *COMMON, "train.tensorboard=false"]
    if config:
        args += ["--config", str(config_path(f"{stage}-shapes.json"))]
    if stage in ("dalle", "clip"):
        args.append(f"data.tokenizer={data['tokenizer']}")
    if stage == "dalle":
        args.append(f"data.dvae={data['dvae']}")
    return [*args, *map(str, extra)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of a fresh training process (no launcher variables of this one)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions"))
    env["PYTHONWARNINGS"] = "ignore"
    return env


def cli(*args, env=None, timeout=300, **kw):
    """`dalle-ar ARGS` in a fresh process -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "dalle_ar.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def same_weights(a, b):
    a, b = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- 1. ZeRO-3 exports every stage --------------------------------------------------------------

def load_export(stage, directory):
    if stage == "dvae":
        from dalle_ar.dvae import DiscreteVAE
        return DiscreteVAE.from_pretrained(directory)
    if stage == "dalle":
        from dalle_ar.dalle import DALLE
        return DALLE.from_pretrained(directory)
    from dalle_ar.rerank import CLIPReranker
    return CLIPReranker.from_pretrained(directory)


@pytest.mark.slow  # ~60 s: three ZeRO-3 runs
@pytest.mark.parametrize("stage", ["dvae", "clip", "dalle"])
def test_zero3_exports_every_stage(data, stage, tmp_path):
    """Finding 1: the export after a ZeRO-3 run (all parameters partitioned) writes the gathered
    weights; they load, and equal what `dalle-ar export` consolidates from the checkpoint."""
    out = tmp_path / stage
    assert cli_main(stage_args(data, stage, out, "--steps", 2, "--save-every", 2, "--deepspeed-config",
                               config_path("zero3.json"), PARTITION_ALL)) == 0
    load_export(stage, out / "export")
    assert cli_main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    assert same_weights(out / "export", tmp_path / "again")


@pytest.mark.slow  # ~60 s: two fresh interpreters importing DeepSpeed
def test_zero3_two_processes_export_the_dvae(data, env, tmp_path):
    """Finding 1 with 2 processes through the `deepspeed` launcher (train/train_dvae.py)."""
    out = tmp_path / "two"
    launcher = Path(sys.executable).with_name("deepspeed")
    script = Path(__file__).resolve().parents[1] / "train" / "train_dvae.py"
    args = stage_args(data, "dvae", out, "--steps", 2, "--save-every", 2, "--deepspeed-config",
                      config_path("zero3.json"), PARTITION_ALL)[2:]
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(engine.free_port()), str(script),
                           *args], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((out / "checkpoints" / "step00000002").glob("*model_states.pt"))) == 2  # really partitioned
    load_export("dvae", out / "export")
    assert cli_main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    assert same_weights(out / "export", tmp_path / "again")


# ---- 2. a SIGTERM to the whole process group, loader workers on -----------------------------------

def wait_for_checkpoint(out, proc, timeout=240):
    deadline = time.time() + timeout
    while engine.latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, "training ended before its first checkpoint: " + proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"no checkpoint in {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow  # ~50 s: two training processes
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_exits_0(data, env, tmp_path):
    """Finding 2: SLURM --signal, systemd and `kill -TERM -- -PGID` signal every process of the job,
    DataLoader workers included. The workers ignore it; the main process finishes its step,
    checkpoints and exits 0, and --resume continues from that step."""
    out = tmp_path / "run"
    args = stage_args(data, "dvae", out, "--steps", 100000, "--save-every", 2, "data.num_workers=2")
    proc = subprocess.Popen([sys.executable, "-m", "dalle_ar.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(out, proc)
        time.sleep(1.0)  # the workers are up and busy
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as `kill -TERM -- -PGID`
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    summary = json.loads(text[text.index("{\n"):])
    stopped = summary["steps"]
    assert summary["interrupted"] is True and 0 < stopped < 100000
    assert engine.latest_checkpoint(out / "checkpoints") == f"step{stopped:08d}"
    resumed = cli(*stage_args(data, "dvae", out, "--steps", stopped + 1, "--resume", "data.num_workers=2"),
                  env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{\n"):])["start_step"] == stopped


# ---- 3. a refused run leaves the run as it was -------------------------------------------------

@pytest.fixture(scope="module")
def dvae_run(data, tmp_path_factory):
    """A finished tiny dVAE run (ZeRO-0, 2 steps) through the CLI: (its args, its folder)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = stage_args(data, "dvae", out, "--steps", 2, "--save-every", 2)
    assert cli_main(args) == 0
    return args, out


def refused(args, capsys, *match):
    """Run `dalle-ar ARGS` in this process: exit 2 with a `dalle-ar CMD: error:` line containing `match`."""
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    line = next((x for x in err.splitlines() if x.startswith(f"dalle-ar {args[0]}: error:")), None)
    assert line is not None and "Traceback" not in err, err[-2000:]
    for m in match:
        assert m in line, line
    return line


def test_a_refused_run_keeps_the_runs_stage_json(dvae_run, capsys, tmp_path):
    """Finding 3: re-running into a finished run without --resume, or --resume with a changed model,
    exits 2 with a clear error and leaves stage.json (and so `dalle-ar export`) as it was."""
    args, out = dvae_run
    before = (out / "stage.json").read_bytes()
    refused([*args, "model.n_hid=16"], capsys, "already holds checkpoints")
    assert (out / "stage.json").read_bytes() == before
    # --resume compares the arguments with the run's stage.json and names the changed key (issue 22)
    refused([*args, "model.n_hid=16", "--resume"], capsys, "model.n_hid=16", "the run has 8")
    assert (out / "stage.json").read_bytes() == before
    assert cli_main(["export", str(out), "--out", str(tmp_path / "export")]) == 0  # still the run's model
    assert json.loads((tmp_path / "export" / "config.json").read_text())["n_hid"] == 8


def test_resume_without_stage_json_checks_the_checkpoints_model(dvae_run, capsys, tmp_path):
    """A run folder without stage.json (an older release's, or trained from Python): the engine still
    refuses a changed model before DeepSpeed loads anything, from the shapes its checkpoint records."""
    import shutil

    args, out = dvae_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "stage.json").unlink()
    moved = [str(copy) if a == str(out) else a for a in args]
    refused([*moved, "model.n_hid=16", "--resume"], capsys, "another model")


def test_resume_with_another_batch_size_is_refused(dvae_run, capsys):
    """Finding 8: the saved data position counts batches; another batch size would silently move it."""
    args, out = dvae_run
    before = (out / "stage.json").read_bytes()
    refused([*args, "--resume", "--steps", "3", "--batch-size", "4"], capsys, "train.batch_size=4", "the run has 8")
    assert (out / "stage.json").read_bytes() == before


# ---- 5. checkpoint pickles never run code ----------------------------------------------------------

class Evil:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow  # ~40 s: two training runs and four refused ones
def test_checkpoint_pickles_never_run_code(data, capsys, tmp_path):
    """Finding 5: DeepSpeed reads its files with torch.load(weights_only=False). Resuming and exporting
    load them weights_only with an allow-list of DeepSpeed's classes: a real ZeRO-2 run resumes and
    exports as before; a crafted file in a run folder is refused, by name, and runs nothing."""
    import shutil

    out = tmp_path / "run"
    args = stage_args(data, "dvae", out, "--save-every", 1, "--deepspeed-config", config_path("zero2.json"))
    assert cli_main([*args, "--steps", "1"]) == 0
    assert cli_main([*args, "--steps", "2", "--resume"]) == 0  # the real files load weights_only
    assert cli_main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    tag = out / "checkpoints" / "step00000002"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        run = tmp_path / f"crafted-{name[:6]}"
        shutil.copytree(out, run)
        marker = tmp_path / f"pwned-{name[:6]}"
        state = torch.load(tag / name, map_location="cpu", weights_only=False)  # our own file: trusted
        state["evil"] = Evil(marker)
        torch.save(state, run / "checkpoints" / tag.name / name)
        run_args = [*stage_args(data, "dvae", run, "--save-every", 1, "--deepspeed-config",
                                config_path("zero2.json")), "--steps", "3", "--resume"]
        refused(run_args, capsys, name, "refused to unpickle posix.system")
        refused(["export", str(run), "--out", str(tmp_path / "x")], capsys, name, "refused to unpickle")
        assert not marker.exists()
        assert not (tmp_path / "x").exists()


# ---- 4. `dalle-ar generate` resumes by what made each row -------------------------------------------

from test_pipeline import parts, pipe_dir  # noqa: E402,F401  (tiny pipeline fixtures)


def generate(capsys, model, prompts, out, *extra):
    """`dalle-ar generate` in this process -> its summary."""
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                     "--candidates", "2", "--device", "cpu", *map(str, extra)]) == 0
    return json.loads(capsys.readouterr().out.split("\ngrid: ")[0])


def rows(out):
    """prompts.jsonl as strict JSON (NaN is not JSON)."""
    def no_nan(x):
        raise AssertionError(f"{x} in prompts.jsonl")
    return [json.loads(x, parse_constant=no_nan) for x in (out / "prompts.jsonl").read_text().split("\n")[:-1]]


@pytest.mark.slow  # eight generate runs: 408 s at load 20 on 2 cores, so well over 30 s unloaded
def test_generate_redoes_rows_whose_inputs_changed_and_repairs_a_torn_line(pipe_dir, capsys, tmp_path):
    """Finding 4: rows are keyed by prompt text, line, seed, candidates, keep, sampling and the model's
    weights, not by line number: a changed prompt, --keep, --seed or model is redone; a torn last line
    (a kill during a write) is dropped and its prompt redone, never glued to the next row."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    assert generate(capsys, pipe_dir, prompts, out)["generated"] == 3
    assert generate(capsys, pipe_dir, prompts, out)["resumed"] == 3  # same inputs: nothing redone

    prompts.write_text("a red circle\na yellow square\na green triangle\n")
    s = generate(capsys, pipe_dir, prompts, out)
    assert (s["generated"], s["resumed"]) == (1, 2)
    assert [(r["line"], r["prompt"]) for r in rows(out)] == [(1, "a red circle"), (3, "a green triangle"),
                                                            (2, "a yellow square")]
    s = generate(capsys, pipe_dir, prompts, out, "--keep", 2)
    assert s["generated"] == 3 and sorted((r["line"], r["rank"]) for r in rows(out)) == [
        (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert generate(capsys, pipe_dir, prompts, out, "--keep", 2, "--seed", 7)["generated"] == 3

    # another model (the prior re-initialised) in a copy of the pipeline
    import shutil

    from dalle_ar.dalle import DALLE

    other = tmp_path / "other"
    shutil.copytree(pipe_dir, other)
    torch.manual_seed(123)
    DALLE(DALLE.from_pretrained(other / "dalle").config).save_pretrained(other / "dalle")
    assert generate(capsys, other, prompts, out, "--keep", 2, "--seed", 7)["generated"] == 3
    assert len(rows(out)) == 6

    # a torn last line: line 3's rows cut mid-write
    text = (out / "prompts.jsonl").read_text().split("\n")[:-1]
    keep = [x for x in text if json.loads(x)["line"] != 3]
    (out / "prompts.jsonl").write_text("".join(x + "\n" for x in keep) + text[-1][:25])
    s = generate(capsys, other, prompts, out, "--keep", 2, "--seed", 7)
    assert (s["generated"], s["resumed"], s["dropped_rows"]) == (1, 2, 1)
    assert sorted((r["line"], r["rank"]) for r in rows(out)) == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert generate(capsys, other, prompts, out, "--keep", 2, "--seed", 7)["generated"] == 0


# ---- 6. every input checked before the first step --------------------------------------------------

@pytest.mark.parametrize("val", ["{root}/none-*.tar", "{root}/none-000000.tar"])
def test_val_shards_that_match_nothing_are_refused_before_training(data, capsys, tmp_path, val):
    """Finding 6: --val-shards matching nothing (a glob, or a missing path) used to crash at the first
    checkpoint (or at --resume); now it is `dalle-ar train: error:` before a single step."""
    out = tmp_path / "run"
    args = stage_args(data, "dvae", out, "--steps", 2, "--val-shards", val.format(root=tmp_path))
    refused(args, capsys, "--val-shards")
    assert not (out / "checkpoints").exists() and not (out / "stage.json").exists()
    bad = ["train", "dvae", "--train-shards", str(tmp_path / "none.tar"), *args[4:]]
    refused(bad, capsys, "--train-shards", "not found")


# ---- 7. a pipeline whose CLIP is gone ------------------------------------------------------------

def test_pipeline_without_its_clip_is_refused_and_no_nan_reaches_json(pipe_dir, capsys, tmp_path):
    """Finding 7: pipeline.json lists a CLIP; without clip/ generation refuses (naming --clip and
    --no-rerank) instead of silently not reranking; with --no-rerank the scores are null, not NaN."""
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    refused(["generate", "--model", str(broken), "--prompts", str(prompts), "--out", str(tmp_path / "o")],
            capsys, "lists a CLIP", "--no-rerank")
    generate(capsys, broken, prompts, tmp_path / "o", "--no-rerank")
    assert [r["score"] for r in rows(tmp_path / "o")] == [None]


# ---- 8. `dalle-ar CMD: error: ...`, exit 2, never a traceback ----------------------------------------

def test_broken_weight_files_are_named(pipe_dir, capsys, tmp_path):
    """A truncated or random model.safetensors names the file; a clip/ without weights names the folder."""
    import shutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    for part, damage in (("dalle", lambda b: b[:300]), ("dvae", lambda b: os.urandom(len(b)))):
        broken = tmp_path / f"pipe-{part}"
        shutil.copytree(pipe_dir, broken)
        f = broken / part / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        refused(["generate", "--model", str(broken), "--prompts", str(prompts), "--out", str(tmp_path / "o")],
                capsys, str(f))
    broken = tmp_path / "pipe-clip"
    shutil.copytree(pipe_dir, broken)
    (broken / "clip" / "model.safetensors").unlink()
    refused(["generate", "--model", str(broken), "--prompts", str(prompts), "--out", str(tmp_path / "o")],
            capsys, str(broken / "clip"), "weights")


def test_out_that_is_a_file(pipe_dir, data, capsys, tmp_path):
    prompts, f = tmp_path / "p.txt", tmp_path / "a-file"
    prompts.write_text("a red circle\n")
    f.write_text("mine\n")
    refused(["generate", "--model", str(pipe_dir), "--prompts", str(prompts), "--out", str(f)], capsys, str(f))
    refused(stage_args(data, "dvae", f, "--steps", 1), capsys, str(f))
    refused(["export", str(data["root"] / "dvae"), "--out", str(f)], capsys, str(f))
    assert f.read_text() == "mine\n"


def test_config_json_errors_and_deepspeed_override_types_are_named(data, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"n_hid": 8,}}')
    refused(stage_args(data, "dvae", tmp_path / "r1", "--config", bad, config=False), capsys, str(bad), "invalid JSON")
    refused(stage_args(data, "dvae", tmp_path / "r2", "--steps", 1, "ds.zero_optimization.stage=abc"), capsys,
            "zero_optimization.stage", "'abc'")


def test_an_epoch_without_batches_says_why(data, capsys, tmp_path):
    """Every sample skipped as bad, or fewer samples than one batch: the error says which."""
    import io
    import tarfile

    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            for ext, payload in (("png", b"not a png"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    args = stage_args(data, "dvae", tmp_path / "r1", "--steps", 1)
    args[3] = str(shard)
    refused(args, capsys, "every sample was skipped", "image: unreadable")
    args = stage_args(data, "dvae", tmp_path / "r2", "--steps", 1, "--batch-size", 32)
    args[3] = data["train"][0]  # 16 samples
    refused(args, capsys, "fewer than one batch")


def test_old_format_pickle_given_to_convert(tmp_path, capsys):
    dall_e = pytest.importorskip("dall_e")
    enc, dec = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    torch.save(dall_e.Encoder(n_hid=64, vocab_size=512, n_blk_per_group=1), enc, _use_new_zipfile_serialization=False)
    torch.save(dall_e.Decoder(n_hid=64, vocab_size=512, n_blk_per_group=1, n_init=32), dec)
    line = refused(["convert", "openai-dvae", "--encoder", str(enc), "--decoder", str(dec), "--out",
                    str(tmp_path / "o")], capsys, str(enc), "legacy")
    assert "will likely succeed" not in line  # not torch's advice to unpickle it anyway


@pytest.mark.slow  # ~30 s: a fresh interpreter importing transformers
def test_ctrl_c_during_generate_keeps_the_rows_and_exits_130(pipe_dir, env, tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    # Enough prompts (~0.1 s each) that the run is still going however late this process gets to send the
    # signal; the child starts with SIGINT as a terminal gives it (default, unblocked), whatever an
    # earlier test left in this process (dispositions set to ignore and blocked masks survive exec).
    prompts.write_text("".join(f"a red circle number {i}\n" for i in range(2000)))

    def terminal_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "dalle_ar.cli", "generate", "--model", str(pipe_dir), "--prompts",
                             str(prompts), "--out", str(out), "--candidates", "2", "--device", "cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    deadline = time.time() + 120
    while not (out / "prompts.jsonl").is_file() or len((out / "prompts.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "dalle-ar generate: interrupted" in err, err[-3000:]
    done = rows(out)
    assert 2 <= len(done) < 2000 and all((out / r["image"]).is_file() for r in done)
