"""The real push code, run offline against a Hub that writes into a local Hub cache.

`HubInAFolder` replaces both Hub clients (transformers' `hf_api()` and `modeling_essm.hub.hub_api`):
its `create_repo` / `create_commit` write every commit as a snapshot in the cache layout that
`from_pretrained` reads (`models--owner--name/snapshots/<commit>/...` and `refs/main`). A fresh
process that cannot import `modeling_essm` then loads the pushed repositories by repo id with
`HF_HUB_OFFLINE=1`, as a user would after downloading them.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import transformers.utils.hub
from conftest import tiny_config
from gradio_client import Client
from huggingface_hub import CommitInfo, CommitOperationAdd, ModelCard, RepoUrl

import modeling_essm.hub
from modeling_essm import ESSSMForCausalLM, ESSSMTokenizer
from modeling_essm.evaluation import write_report
from modeling_essm.cli import explore_main
from modeling_essm.hub import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from explorer_browser import free_port, served  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
K = 16  # num_spectral_filters of tiny_config
REPO = "essm-test/tiny"
PLAIN_REPO = "essm-test/plain"  # pushed with model.push_to_hub alone
COMPACT_BUDGETS = (4, 8)


class HubInAFolder:
    """Stands in for `huggingface_hub.HfApi`: repositories and commits land in a local Hub cache."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.calls = []

    def repo_folder(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str) -> Path:
        folder = self.repo_folder(repo_id)
        return folder / "snapshots" / (folder / "refs" / "main").read_text()

    def create_repo(self, repo_id, *, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id))
        refs = self.repo_folder(repo_id) / "refs"
        if refs.exists() and not exist_ok:
            raise FileExistsError(repo_id)
        refs.mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kwargs):
        """A new snapshot: the parent commit's files plus the added ones; refs/<branch> moves to it."""
        self.calls.append(("create_commit", repo_id))
        folder = self.repo_folder(repo_id)
        ref = folder / "refs" / (revision or "main")
        commit = hashlib.sha1(f"{repo_id}:{len(self.calls)}:{commit_message}".encode()).hexdigest()
        snapshot = folder / "snapshots" / commit
        if ref.exists():
            shutil.copytree(folder / "snapshots" / ref.read_text(), snapshot)
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd), operation
            target = snapshot / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as source:
                target.write_bytes(source.read())
        ref.write_text(commit)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}",
                          commit_message=commit_message, commit_description="", oid=commit)


def route_hub_calls(monkeypatch, hub):
    monkeypatch.setattr(transformers.utils.hub, "hf_api", lambda: hub)
    monkeypatch.setattr(modeling_essm.hub, "hub_api", hub)


def tokens(batch=2, seq_len=40, seed=0):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ESSSMForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def saved_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    ESSSMTokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sweep_file(model, tmp_path_factory):
    """A budget sweep in the format essm-eval-budgets writes (its own writer, made-up numbers)."""
    rows = [{"budget": k, "bits_per_byte": 2.0 + 1.0 / k, "loss": 1.4 + 0.7 / k,
             "parameters": model.slice_to_budget(k).num_parameters(), "tokens_per_second": 1000.0 * k}
            for k in (2, 4, 8, K)]
    settings = {"model_dir": "runs/tiny", "task": "tiny_shakespeare", "eval_samples": 64, "command": "essm-eval-budgets runs/tiny"}
    return write_report(rows, tmp_path_factory.mktemp("sweep"), settings)["json"]


@pytest.fixture(scope="module")
def pushed(model, saved_folder, sweep_file, tmp_path_factory):
    """The push script and model.push_to_hub, both run against one HubInAFolder."""
    hub = HubInAFolder(tmp_path_factory.mktemp("hub") / "cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        route_hub_calls(monkeypatch, hub)
        main([str(saved_folder), REPO, "--budgets", ",".join(map(str, COMPACT_BUDGETS)), "--sweep", str(sweep_file)])
        model.push_to_hub(PLAIN_REPO)
    return hub


CLEAN_PROCESS = textwrap.dedent(
    """
    import json, sys, traceback
    sys.modules["modeling_essm"] = None  # only the code pushed to the Hub may run
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = json.loads(sys.argv[1])
    x = torch.tensor(spec["input_ids"])
    logits, modules, tokens, snippets = {}, {}, {}, {}
    for repo_id, budgets in spec["models"].items():
        model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
        modules[repo_id] = type(model).__module__
        if repo_id in spec["snippets"]:  # pushed with the tokenizer
            tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
            tokens[repo_id] = {"module": type(tokenizer).__module__, "ids": tokenizer("To be, or not to be")["input_ids"]}
        with torch.no_grad():
            logits[repo_id] = {str(k): model(x, spectral_budget=k).logits.tolist() for k in budgets}
    for repo_id, code in spec["snippets"].items():
        try:
            exec(code, {})
            snippets[repo_id] = "ok"
        except Exception:
            snippets[repo_id] = traceback.format_exc()
    print(json.dumps({"logits": logits, "modules": modules, "tokens": tokens, "snippets": snippets}))
    """
)


def python_blocks(readme: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S))


@pytest.fixture(scope="module")
def loaded_by_repo_id(pushed, tmp_path_factory):
    """Loads every pushed repository by id in a fresh process (offline, no modeling_essm) and runs the cards' code."""
    workdir = tmp_path_factory.mktemp("clean")
    compact_repos = {f"{REPO}-k{k}": [None, 2] for k in COMPACT_BUDGETS}
    spec = {
        "input_ids": tokens().tolist(),
        "models": {REPO: [2, 8, None], PLAIN_REPO: [3, None], **compact_repos},
        "snippets": {repo_id: python_blocks(pushed.snapshot(repo_id) / "README.md") for repo_id in (REPO, *compact_repos)},
    }
    env = {**os.environ, "HF_HUB_CACHE": str(pushed.cache), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(workdir / "modules")}
    result = subprocess.run([sys.executable, "-c", CLEAN_PROCESS, json.dumps(spec)], capture_output=True, text=True,
                            env=env, cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def budget(k):
    return None if k == "None" else int(k)


# --- the pushed repositories ---------------------------------------------------------------------------


def test_the_repository_holds_everything_a_user_needs(pushed, saved_folder, sweep_file):
    snapshot = pushed.snapshot(REPO)
    files = {path.name for path in snapshot.iterdir()}
    # Exactly what save_pretrained writes (model and tokenizer, with their code), the card and the plot.
    assert files == {path.name for path in saved_folder.iterdir()} | {"README.md", "budget_sweep.png",
                                                                     "budget_sweep.json"}
    assert {"model.safetensors", "generation_config.json", "configuration_essm.py", "modeling_essm.py",
            "tokenizer_config.json", "tokenization_essm.py"} <= files
    auto_map = json.loads((snapshot / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert (snapshot / "budget_sweep.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((snapshot / "budget_sweep.json").read_text()) == json.loads(sweep_file.read_text())
    assert [call for call in pushed.calls if call[1] == REPO] == [("create_repo", REPO), ("create_commit", REPO)]


def test_the_model_card_shows_usage_at_a_budget_the_sweep_and_the_compact_exports(pushed):
    card = ModelCard.load(pushed.snapshot(REPO) / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "custom_code" in card.data.tags
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert f'AutoTokenizer.from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert "model(**inputs, spectral_budget=4)" in card.text
    assert "model.generate(**inputs, spectral_budget=4" in card.text
    for k in (2, 4, 8, K):  # one table row per swept budget
        assert re.search(rf"^\| {k} \| {2.0 + 1.0 / k:.4f} \|", card.text, flags=re.M)
    assert "![Quality and cost at each spectral budget](budget_sweep.png)" in card.text
    # The same numbers as model-index entries, which the Hub shows as evaluation results.
    results = {result.metric_name: result for result in card.data.eval_results}
    assert set(results) == {f"bits_per_byte at spectral budget {k}" for k in (2, 4, 8, K)}
    assert all(r.metric_value == pytest.approx(2.0 + 1.0 / int(name.rsplit(" ", 1)[1])) for name, r in results.items())
    assert {r.dataset_type for r in results.values()} == {"tiny_shakespeare"}
    for k in COMPACT_BUDGETS:
        assert f"[{REPO}-k{k}](https://huggingface.co/{REPO}-k{k})" in card.text
    assert f"`essm-explore {REPO}`" in card.text  # the explorer, one command away


def test_logits_by_repo_id_in_a_clean_process_equal_the_original(model, loaded_by_repo_id):
    assert loaded_by_repo_id["modules"][REPO].startswith("transformers_modules")
    with torch.no_grad():
        for k, logits in loaded_by_repo_id["logits"][REPO].items():
            assert torch.equal(torch.tensor(logits), model(tokens(), spectral_budget=budget(k)).logits), k


def test_the_tokenizer_loads_by_repo_id_from_the_pushed_code(loaded_by_repo_id):
    assert set(loaded_by_repo_id["tokens"]) == {REPO, *(f"{REPO}-k{k}" for k in COMPACT_BUDGETS)}
    for tokenizer in loaded_by_repo_id["tokens"].values():
        assert tokenizer["module"].startswith("transformers_modules")
        assert tokenizer["ids"] == list(b"To be, or not to be")


def test_model_push_to_hub_alone_makes_a_loadable_repository(model, pushed, loaded_by_repo_id):
    assert "modeling_essm.py" in {path.name for path in pushed.snapshot(PLAIN_REPO).iterdir()}
    assert loaded_by_repo_id["modules"][PLAIN_REPO].startswith("transformers_modules")
    with torch.no_grad():
        for k, logits in loaded_by_repo_id["logits"][PLAIN_REPO].items():
            assert torch.equal(torch.tensor(logits), model(tokens(), spectral_budget=budget(k)).logits), k


@pytest.mark.parametrize("k", COMPACT_BUDGETS)
def test_compact_exports_equal_the_full_model_at_their_budget(model, pushed, loaded_by_repo_id, k):
    repo_id = f"{REPO}-k{k}"
    snapshot = pushed.snapshot(repo_id)
    assert json.loads((snapshot / "config.json").read_text())["num_spectral_filters"] == k
    assert (snapshot / "model.safetensors").stat().st_size < (pushed.snapshot(REPO) / "model.safetensors").stat().st_size
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == REPO
    with torch.no_grad():
        for compact_budget, logits in loaded_by_repo_id["logits"][repo_id].items():
            expected = model(tokens(), spectral_budget=budget(compact_budget) or k).logits
            torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-5, rtol=1e-5)


def test_the_usage_code_of_every_card_runs_by_repo_id(loaded_by_repo_id):
    assert loaded_by_repo_id["snippets"] and set(loaded_by_repo_id["snippets"].values()) == {"ok"}, \
        loaded_by_repo_id["snippets"]


# --- bad arguments are refused before anything is written ----------------------------------------------


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


BAD_ARGUMENTS = {
    "repo id with a space": (lambda saved, tmp: [saved, "essm test/tiny"], "Invalid Hub repo id"),
    "repo id without owner": (lambda saved, tmp: [saved, "tiny"], "as 'owner/name'"),
    "compact repo id too long": (lambda saved, tmp: [saved, "o/" + "x" * 95, "--budgets", "4"], "Invalid Hub repo id"),
    "missing folder": (lambda saved, tmp: [tmp / "missing", REPO], "has no config.json"),
    "another model type": (lambda saved, tmp: [write_json(tmp / "bert" / "config.json", {"model_type": "bert"}).parent,
                                               REPO], "model_type='bert', not 'essm'"),
    "no weights": (lambda saved, tmp: [shutil.copytree(saved, tmp / "no-weights",
                                                       ignore=shutil.ignore_patterns("*.safetensors")), REPO],
                   "has no safetensors weights"),
    "budget below the range": (lambda saved, tmp: [saved, REPO, "--budgets", "4,1"], r"in \[2, 16\]"),
    "budget above the range": (lambda saved, tmp: [saved, REPO, "--budgets", "17"], r"in \[2, 16\]"),
    "budgets not integers": (lambda saved, tmp: [saved, REPO, "--budgets", "4,x"], "comma-separated integers"),
    "missing sweep": (lambda saved, tmp: [saved, REPO, "--sweep", tmp / "none.json"], "does not exist"),
    "not a sweep": (lambda saved, tmp: [saved, REPO, "--sweep", write_json(tmp / "other.json", {"loss": 1})],
                    "is not a budget sweep"),
    "sweep of a larger model": (lambda saved, tmp: [saved, REPO, "--sweep",
                                                    write_json(tmp / "k32.json", {"results": [{"budget": 32}]})],
                                r"in \[2, 16\]"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_fail_clearly_before_anything_is_written(case, saved_folder, tmp_path, monkeypatch, capsys):
    make_argv, message = BAD_ARGUMENTS[case]
    hub = HubInAFolder(tmp_path / "cache")
    route_hub_calls(monkeypatch, hub)
    argv = [str(arg) for arg in make_argv(saved_folder, tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert hub.calls == [] and not hub.cache.exists()


def test_the_script_and_the_console_command_run_the_same_main(saved_folder, tmp_path):
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["essm-push-to-hub"] == "modeling_essm.hub:main"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), str(saved_folder), "tiny"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "as 'owner/name'" in result.stderr, result.stderr[-2000:]


def test_compact_exports_refuse_per_layer_budgets_before_anything_is_written(saved_folder, tmp_path, monkeypatch):
    hub = HubInAFolder(tmp_path / "cache")
    route_hub_calls(monkeypatch, hub)
    with pytest.raises(ValueError, match="compact exports take integer budgets"):
        modeling_essm.hub.push_essm_to_hub(saved_folder, REPO, budgets=[4, [2, 8]])
    assert hub.calls == [] and not hub.cache.exists()


# --- a Space for the explorer of a pushed model --------------------------------------------------------


SPACE_PROCESS = """
import runpy, sys
sys.modules["modeling_essm"] = None  # a Space has the pushed model's code, not the package
sys.path.insert(0, ".")
runpy.run_path("app.py", run_name="__main__")
"""


def test_a_space_is_refused_for_a_bad_repo_id_or_a_used_folder_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep me")
    for argv, message in (([REPO, "--write-space", str(tmp_path / "used")], "exists and is not an empty folder"),
                          (["tiny", "--write-space", str(tmp_path / "new")], "as 'owner/name'")):
        with pytest.raises(SystemExit) as exit_info:
            explore_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "used").iterdir()] == ["mine.txt"] and not (tmp_path / "new").exists()


def test_the_space_serves_the_pushed_model_without_the_package(model, pushed, tmp_path):
    explore_main([REPO, "--write-space", str(tmp_path / "space")])
    space = tmp_path / "space"
    assert sorted(path.name for path in space.iterdir()) == ["README.md", "app.py", "explorer.py", "requirements.txt"]
    metadata = ModelCard.load(space / "README.md").data
    assert (metadata.sdk, metadata.app_file, metadata.models) == ("gradio", "app.py", [REPO])
    assert "torch>=2.4" in (space / "requirements.txt").read_text().splitlines()
    port = free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(pushed.cache), "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "GRADIO_SERVER_NAME": "127.0.0.1"}
    with served([sys.executable, "-c", SPACE_PROCESS], port, env=env, cwd=space) as url:
        client = Client(url, verbose=False)
        # The Space found the sweep pushed with the model, and generates what the model generates at a budget.
        summary, _ = client.predict(4, False, *[K, K], api_name="/show_budget")
        assert "bits per byte 2.250 in the sweep" in summary  # 2.0 + 1/4, as the sweep file says
        text, stats = client.predict("To be", 8, 0, 4, False, *[K, K], api_name="/generate")
    tokenizer = ESSSMTokenizer()
    input_ids = tokenizer("To be", return_tensors="pt").input_ids
    expected = model.generate(input_ids, spectral_budget=4, max_new_tokens=8, do_sample=False)
    assert text == tokenizer.decode(expected[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert stats.startswith("k=4") and "8 tokens" in stats
