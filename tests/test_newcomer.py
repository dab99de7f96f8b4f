"""Issue 22: training as a newcomer meets it (help, shipped configs by name, the docs' commands)."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dalle_ar.cli import build_parser
from dalle_ar.cli import main as cli_main
from run_harness import LAUNCH_VARS


def all_parsers(parser, name="dalle-ar"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help_and_shows_its_default():
    for name, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        text = parser.format_help()
        assert "specs/" not in text, f"{name} --help cites a spec file the package does not ship"
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"default: {action.default}" in text or "default" in (action.help or ""), \
                    f"{name} {action.option_strings[0]}: default {action.default!r} not shown"


@pytest.mark.parametrize("stage, needs", [("dvae", []), ("dalle", ["data.tokenizer=DIR", "data.dvae=DIR"]),
                                          ("clip", ["data.tokenizer=DIR"])])
def test_stage_help_lists_needs_and_config_keys_with_defaults(stage, needs, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", stage, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--train-shards" in out and "needs: --train-shards and --out" in out
    for need in needs:
        assert need in out
    shipped = {"dvae": "dvae-digits, dvae-fsq-digits, dvae-fsq-shapes, dvae-shapes"}.get(stage, f"{stage}-digits, {stage}-shapes")
    assert f"shipped configs (--config NAME; `dalle-ar configs --show NAME`): {shipped}" in out
    assert "train.warmup = 100" in out and "train.eval_every = 0" in out and "data.num_workers = 0" in out
    assert {"dvae": "model.vocab_size = 512", "dalle": "model.dim = 256", "clip": "data.text_len = 32"}[stage] in out


def test_dvae_schedules_longer_than_the_run_are_named_with_a_scaled_value():
    """Issue 22, item 3: the dVAE's own step schedules (model settings, not scaled silently) warn on a short run."""
    from dalle_ar.train.stages import STAGES, load_stage_config

    def warnings(*overrides):
        return STAGES["dvae"](*load_stage_config("dvae", "dvae-shapes", overrides)[:3], [], None, "run").warnings()

    assert warnings("train.steps=300") == [
        "WARNING: model.kl_warmup_steps=800 >= train.steps=300: the KL weight never reaches model.kl_weight; "
        "scale it to the run (e.g. model.kl_warmup_steps=120)",
        "WARNING: model.temp_anneal_steps=1200 >= train.steps=300: the Gumbel temperature never reaches "
        "model.temp_end; scale it to the run (e.g. model.temp_anneal_steps=180)",
        "WARNING: model.hard_codes_from_step=1600 >= train.steps=300: the decoder-only phase on hard codes never "
        "starts; scale it to the run (e.g. model.hard_codes_from_step=240)"]
    assert warnings() == []  # the shipped config fits its own 2900 steps
    assert warnings("train.steps=1500") == [
        "WARNING: model.hard_codes_from_step=1600 >= train.steps=1500: the decoder-only phase on hard codes never "
        "starts; scale it to the run (e.g. model.hard_codes_from_step=1200)"]


def test_shipped_configs_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """`--config dvae-shapes` and `dalle-ar configs` work outside the checkout; copies are never overwritten."""
    from dalle_ar.train import find_config
    from dalle_ar.train.stages import load_stage_config

    monkeypatch.chdir(tmp_path)
    model, train, _, _ = load_stage_config("dvae", "dvae-shapes", [])
    assert model.vocab_size == 256 and train.steps == 2900
    assert find_config("zero3.json").name == "zero3.json"
    with pytest.raises(FileNotFoundError, match="not a shipped config.*dvae-shapes"):
        find_config("dvae-shape")
    assert cli_main(["configs"]) == 0
    assert "dvae-shapes" in capsys.readouterr().out
    assert cli_main(["configs", "dalle-shapes", "zero2", "--copy", "mine"]) == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["dalle-shapes.json", "zero2.json"]
    assert json.loads((tmp_path / "mine" / "dalle-shapes.json").read_text())["model"]["dim"] == 192
    capsys.readouterr()
    assert cli_main(["configs", "zero2", "--copy", "mine"]) == 2
    assert "already exist" in capsys.readouterr().err


def test_the_launcher_entry_points_are_modules(tmp_path):
    """`python -m dalle_ar.train.train_<stage>` (what torchrun -m / deepspeed --module run) works from any
    directory and shows the stage's help."""
    out = subprocess.run([sys.executable, "-m", "dalle_ar.train.train_clip", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python -m dalle_ar.train.train_clip" in out.stdout and "data.tokenizer=DIR" in out.stdout


# ---- the walk through docs/training.md ---------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"

# What the walk changes: step counts and sizes only, appended to the doc's own commands (a later option or
# key=value wins). Everything else (paths, folders, configs, flags) is the doc's, run by bash as written.
SMALL = {
    "train dvae": "--steps 2 --batch-size 4 --save-every 2 train.eval_every=1 model.image_size=32 model.vocab_size=32 "
                  "model.n_hid=8 model.n_init=8 data.sample_count=2",
    "train clip": "--steps 2 --batch-size 4 --save-every 2 train.eval_every=1 data.image_size=32 model.patch_size=16 "
                  "model.embed_dim=16 model.text_width=16 model.vision_width=16 model.text_layers=1 "
                  "model.vision_layers=1 model.text_heads=2 model.vision_heads=2 data.text_len=16",
    "train dalle": "--steps 2 --batch-size 4 --save-every 2 train.eval_every=1 model.text_len=16 model.dim=32 "
                   "model.depth=2 model.heads=2 data.sample_count=2",
    "resume dalle": "--steps 3",
    "generate": "--candidates 2 --keep 1 --batch-size 2",
}


def doc_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)


def walk_script() -> str:
    """docs/training.md's bash blocks, in order, with `dalle-ar` wrapped to append SMALL."""
    case = "\n".join(f'    "{key}") extra=({value});;' for key, value in SMALL.items())
    return f"""set -euo pipefail
dalle-ar() {{
  local extra=() key="$1 ${{2:-}}"
  [[ "$key" == "train dalle" && " $* " == *" --resume "* ]] && key="resume dalle"
  [[ "$1" == generate ]] && key=generate
  case "$key" in
{case}
  esac
  echo "+ dalle-ar $* ${{extra[*]:-}}" >&2
  command dalle-ar "$@" "${{extra[@]}}"
}}
""" + "\n".join(doc_blocks())


def tiny_photos(root: Path) -> None:
    """A newcomer's folder: photos/{train,val}/NAME.png + NAME.txt (40 px coloured shapes on grey)."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40), "yellow": (230, 210, 30)}
    for split, n in (("train", 12), ("val", 4)):
        (root / "photos" / split).mkdir(parents=True)
        for i in range(n):
            colour, shape = list(colours)[i % 4], ("circle", "square")[i // 4 % 2]
            image = Image.new("RGB", (40, 40), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8 + i % 3, 8, 30, 30 - i % 3), fill=colours[colour])
            image.save(root / "photos" / split / f"{split}{i:02d}.png")
            (root / "photos" / split / f"{split}{i:02d}.txt").write_text(f"a {colour} {shape}\n")


def test_the_walk_covers_every_step_of_the_page():
    script = walk_script()
    for needed in ("dalle-ar data folder photos/train/", "dalle-ar tokenizer train", "dalle-ar train dvae",
                   "dalle-ar encode", "dalle-ar train clip", "dalle-ar train dalle", "--resume", "dalle-ar pipeline",
                   "dalle-ar generate"):
        assert needed in script, needed
    assert "bf16" not in "".join(doc_blocks())  # the CPU-safe example (fp32 is the default)


@pytest.mark.slow  # ~3 min: eleven fresh `dalle-ar` processes
def test_docs_training_walk_from_a_folder_of_images_outside_the_checkout(tmp_path):
    """Issue 22, done: docs/training.md's commands, run by bash as written (only step counts and sizes made
    small), on a tiny folder of images in a directory outside the checkout, end with a generated grid."""
    from PIL import Image

    tiny_photos(tmp_path)
    # Without the launcher variables an earlier in-process run left behind: its MASTER_PORT is still
    # held by this process's process group, and the walk's commands would try to listen on it.
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARS},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", walk_script()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    grid = Image.open(tmp_path / "generated" / "grid.png")
    assert grid.size[0] >= 32 and grid.size[1] >= 2 * 32  # one row per prompt
    # the layout the page promises
    assert (tmp_path / "shards" / "train" / "train-000000.tar").is_file()
    assert (tmp_path / "shards" / "val" / "val-summary.json").is_file()
    assert (tmp_path / "codes" / "train" / "train-codes-000000.tar").is_file()
    assert "asked for --vocab-size 16384, but the captions only give" in log
    assert "[engine] WARNING: train.warmup=100 >= the run's 2 steps" in log  # short runs say so
    assert "[dvae] WARNING: model.kl_warmup_steps=5000 >= train.steps=2" in log
    assert "[engine] step 1/2 validation psnr" in log and "validation retrieval_top1" in log
    assert "validation loss_text" in log
    resumed = json.loads((tmp_path / "runs" / "dalle" / "stage.json").read_text())
    assert resumed["config"]["train"]["steps"] == 3 and resumed["config"]["model"]["dim"] == 32
    assert len((tmp_path / "generated" / "prompts.jsonl").read_text().splitlines()) == 2
