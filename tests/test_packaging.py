"""The core package needs only its declared dependencies; the commands that need an extra say which."""

import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from modeling_essm import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "modeling_essm"
# The model, budgets, generation, tokenizer, Hub push, export and the command-line entry points.
CORE_MODULES = ("__init__", "budget", "cache_essm", "cli", "configuration_essm", "export_essm", "folders", "hub",
                "modeling_essm", "naive", "spectral_channels", "spectral_filters", "speculative_essm", "tokenization_essm")
# Installed by the core dependencies themselves (transformers brings tokenizers, tqdm, packaging, ...).
BROUGHT_BY_TRANSFORMERS = {"tokenizers"}


def module_level_imports(path: Path) -> tuple[set, set]:
    """(absolute top-level packages, relative module names) imported at module level, not inside functions."""
    absolute, relative = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(node.module.split(".")[0])
            else:
                absolute.add(node.module.split(".")[0])
    return absolute, relative


def test_the_core_modules_import_only_the_core_dependencies_and_each_other():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {requirement.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_")
               for requirement in declared} | BROUGHT_BY_TRANSFORMERS | set(sys.stdlib_module_names)
    for name in CORE_MODULES:
        absolute, relative = module_level_imports(PACKAGE / f"{name}.py")
        assert absolute <= allowed, f"{name}.py imports {absolute - allowed}, which the core does not install"
        assert relative <= set(CORE_MODULES), f"{name}.py imports {relative - set(CORE_MODULES)} at module level"


@pytest.mark.parametrize("command, extra, missing", [
    (cli.train_main, "train", "yaml"), (cli.eval_budgets_main, "train", "yaml"), (cli.plan_main, "train", "yaml"),
    (cli.compare_main, "bench", "yaml"), (cli.train_sharded_main, "train", "yaml"), (cli.explore_main, "explore", "gradio"),
])
def test_a_command_without_its_extra_says_what_to_install_in_one_line(command, extra, missing, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == missing else real(name, *args))
    with pytest.raises(SystemExit) as exit:
        command(["whatever.yaml"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: this command needs {missing}, which the core package does not "
                                            f"install: pip install 'modeling_essm[{extra}]'\n")


CORE_ONLY = textwrap.dedent(
    """
    import pathlib
    import huggingface_hub
    import torch
    import modeling_essm
    from transformers import AutoModelForCausalLM, AutoConfig
    from modeling_essm.export_essm import export_at_budget
    import modeling_essm.hub

    config = AutoConfig.for_model("essm", hidden_size=16, num_hidden_layers=2, num_spectral_filters=4,
                                  max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 256, (1, 8))
    print(model(ids, spectral_budget=[2, 4]).logits.shape)
    print(model.generate(ids, max_new_tokens=4, spectral_budget=2, do_sample=False).shape)
    export_at_budget(model, 2, input_ids=ids.repeat(2, 1))  # an example batch of 1 would fix the batch size at 1

    class HubInAFolder:  # stands in for the Hub: the real push code writes each repository into a folder
        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                target = pathlib.Path("hub", repo_id, operation.path_in_repo)
                target.parent.mkdir(parents=True, exist_ok=True)
                with operation.as_file() as source:
                    target.write_bytes(source.read())
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0",
                                              commit_message="", commit_description="", oid="0")

    modeling_essm.hub.hub_api = HubInAFolder()
    model.save_pretrained("saved")
    modeling_essm.build_fast_tokenizer().save_pretrained("saved")
    modeling_essm.hub.push_essm_to_hub("saved", "me/tiny", budgets=[2])
    print(sorted(path.name for path in pathlib.Path("hub/me/tiny-k2").iterdir()))
    for extra in ("datasets", "accelerate", "matplotlib", "PIL"):  # PyYAML comes with transformers itself
        try:
            __import__(extra)
            print("installed", extra)
        except ImportError:
            pass
    """
)


@pytest.mark.slow
def test_pip_install_without_extras_gives_a_package_that_runs(tmp_path):
    """A fresh virtual environment: `pip install .` alone, then forward, generate, export and a push (minutes: it
    installs torch and transformers)."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    # A copy of the sources: an in-tree build would leave build/ in the repository.
    source = shutil.copytree(REPO_ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", "outputs", "build", "*.egg-info", "__pycache__", ".cache", ".pytest_cache"))
    subprocess.run([*pip, str(source)], check=True, cwd=tmp_path)
    result = subprocess.run([python, "-c", CORE_ONLY], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[:2] == ["torch.Size([1, 8, 259])", "torch.Size([1, 12])"]
    assert "model.safetensors" in lines[2] and "README.md" in lines[2] and "tokenizer.json" in lines[2]  # pushed
    assert "installed" not in result.stdout  # no extra came along
    train = subprocess.run([str(tmp_path / "venv" / "bin" / "essm-train"), "config.yaml"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert train.returncode == 2 and "pip install 'modeling_essm[train]'" in train.stderr
