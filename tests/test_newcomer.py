"""Issue 22: training as a newcomer meets it (help, shipped configs by name, the docs' commands)."""

import argparse
import json
import subprocess
import sys

import pytest

from dalle_ar.cli import build_parser
from dalle_ar.cli import main as cli_main


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
    assert f"shipped configs (--config NAME; `dalle-ar configs --show NAME`): {stage}-digits, {stage}-shapes" in out
    assert "train.warmup = 100" in out and "train.eval_every = 0" in out and "data.num_workers = 0" in out
    assert {"dvae": "model.vocab_size = 512", "dalle": "model.dim = 256", "clip": "data.text_len = 32"}[stage] in out


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
