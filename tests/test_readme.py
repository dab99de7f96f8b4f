"""The README's commands exist and accept the arguments it shows (README examples must not drift)."""

import re
import shlex
from pathlib import Path

import pytest

from dalle_ar.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_lines():
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def dalle_ar_commands(lines):
    cmds = []
    for line in lines:
        for part in re.split(r"&&|;|\|", line):
            words = shlex.split(part)
            if words and words[0] == "dalle-ar":
                cmds.append(words[1:])
    return cmds


def test_readme_has_the_two_commands():
    lines = bash_lines()
    assert len(lines) == 2, lines
    assert "dalle-ar demo" in lines[0]
    assert lines[1] == "python -m pytest -q"


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert bash_lines()[1] in ci.splitlines()


@pytest.mark.parametrize("argv", dalle_ar_commands(bash_lines()))
def test_readme_commands_parse(argv):
    build_parser().parse_args(argv)  # argparse exits (test fails) on an unknown command or argument


def inline_commands():
    """`dalle-ar data shapes\\|digits` in the README's tables -> [data, shapes], [data, digits]."""
    found = set()
    for m in re.finditer(r"`dalle-ar ([a-z][a-z \\|-]*)`", README.read_text()):
        *head, last = m.group(1).split()
        for alt in last.split("\\|"):
            found.add(tuple(head + [alt]))
    return sorted(found)


@pytest.mark.parametrize("words", inline_commands())
def test_readme_inline_commands_exist(words, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*words, "--help"])
    assert e.value.code == 0, f"dalle-ar {' '.join(words)} is not a command"
