"""The one-way dependency rules of docs/architecture.md, read from the source with `ast`.

Every import counts, at the top of a module or inside a function, and rules about third-party
packages (DeepSpeed) follow imports through the package transitively.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package lives in the repository (setup.cfg's package_dir).
TREES = {"dalle_ar": ROOT / "dalle_ar", "dalle_ar.tokenizer": ROOT / "tokenizer", "dalle_ar.train": ROOT / "train"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, tree in TREES.items():
        for path in tree.rglob("*.py"):
            parts = list(path.relative_to(tree).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Absolute names of everything `name` imports (relative imports resolved)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def _owner(name: str):
    """The project module an imported name belongs to (a module or its package), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _reach(name: str) -> set[str]:
    """Everything `name` imports, following project modules transitively."""
    seen, todo, out = set(), [name], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for imp in _imports(mod):
            out.add(imp)
            if (own := _owner(imp)) is not None and own not in seen:
                todo.append(own)
                if own != imp:
                    out.add(own)
    return out


def _under(names, prefixes) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


MODELS = ["dalle_ar.dvae", "dalle_ar.dalle", "dalle_ar.transformer", "dalle_ar.rerank", "dalle_ar.clip",
          "dalle_ar.checks", "dalle_ar.images", "dalle_ar.io", "dalle_ar.vqgan", "dalle_ar.quantizers",
          "dalle_ar.image_tokenizer"]


@pytest.mark.parametrize("module", MODELS)
def test_models_import_no_engine_data_training_or_cli(module):
    bad = _under(_reach(module), ["deepspeed", "dalle_ar.engine", "dalle_ar.data", "dalle_ar.train",
                                  "dalle_ar.cli", "dalle_ar.tokenizer", "dalle_ar.pipeline", "argparse"])
    assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("module", ["dalle_ar.pipeline", "dalle_ar.generate"])
def test_inference_never_imports_deepspeed_the_engine_or_training(module):
    bad = _under(_reach(module), ["deepspeed", "dalle_ar.engine", "dalle_ar.train", "dalle_ar.cli", "argparse"])
    assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("package", ["dalle_ar.data", "dalle_ar.tokenizer"])
def test_data_and_tokenizer_import_no_model(package):
    for module in _under(MODULES, [package]):
        bad = _under(_reach(module), [*MODELS[:5], "dalle_ar.pipeline", "dalle_ar.engine", "dalle_ar.train",
                                      "dalle_ar.cli", "deepspeed"])
        assert not bad, f"{module} reaches {bad}"


def test_engine_knows_no_stage():
    for module in _under(MODULES, ["dalle_ar.engine"]):
        project = {_owner(n) for n in _imports(module)} - {None}
        bad = sorted(m for m in project if not (m.startswith("dalle_ar.engine") or m in ("dalle_ar.io", "dalle_ar.train")))
        assert not bad, f"{module} imports {bad}"


def test_the_server_is_a_client_of_the_pipeline():
    """dalle_ar.serve reaches the models through the pipeline only: no engine, DeepSpeed, training or CLI."""
    for module in _under(MODULES, ["dalle_ar.serve"]):
        bad = _under(_reach(module), ["deepspeed", "dalle_ar.engine", "dalle_ar.train", "dalle_ar.cli"])
        assert not bad, f"{module} reaches {bad}"


def test_only_the_cli_parses_arguments_and_nothing_imports_it():
    """Library modules hold no argparse and never call the CLI (train/train_<stage>.py are launcher
    scripts: command lines themselves)."""
    for module in MODULES:
        if module.startswith(("dalle_ar.cli", "dalle_ar.train.train_")):
            continue
        imports = _imports(module)
        assert not _under(imports, ["dalle_ar.cli"]), f"{module} imports the CLI"
        assert "argparse" not in imports, f"{module} parses arguments: that is dalle_ar.cli's job"


def test_cli_imports_only_library_entry_points():
    """The CLI sits on top: its modules import library code, never each other's handlers in a loop."""
    for module in _under(MODULES, ["dalle_ar.cli"]):
        bad = _under(_imports(module), ["deepspeed", "torch", "transformers"])
        assert not bad, f"{module} imports {bad} directly; call a library function instead"


def test_help_stays_light():
    code = ("import sys; from dalle_ar.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_budget_choices_match_the_budgets():
    from dalle_ar.cli.demo import BUDGET_NAMES
    from dalle_ar.demo import BUDGETS

    assert sorted(BUDGET_NAMES) == sorted(BUDGETS)


def test_demo_image_tokenizer_choices_match_the_demo():
    from dalle_ar.cli.demo import IMAGE_TOKENIZER_NAMES
    from dalle_ar.demo import BUDGETS, IMAGE_TOKENIZERS

    assert list(IMAGE_TOKENIZER_NAMES) == list(IMAGE_TOKENIZERS)
    assert all(name in budget for budget in BUDGETS.values() for name in IMAGE_TOKENIZERS)


def test_every_stage_is_offered_by_the_cli():
    from dalle_ar.train import STAGE_NAMES
    from dalle_ar.train.stages import STAGES

    assert list(STAGE_NAMES) == list(STAGES)
