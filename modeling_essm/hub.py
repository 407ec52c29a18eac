"""Share an ES-SSM on the Hugging Face Hub: one complete repository per model, with a budget model card.

A pushed repository holds the config (with `auto_map` for the four Auto classes), the safetensors
weights, the modeling code for `trust_remote_code=True`, the generation config, the tokenizer when
the saved folder has one, and a model card with usage code and, given a budget sweep, the
quality at every budget. Compact exports (`slice_to_budget(k)`) go to their own repositories
named `<repo_id>-k<k>`, so each loads with one line and shows its own size and card.

Everything is checked (repo ids, folder, budgets, sweep) before anything is written or pushed.
"""

import argparse
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, SpaceCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoTokenizer

from .cli import require_extra
from .folders import check_new_folder, written_atomically
from .modeling_essm import (
    ESSSMForCausalLM,
    ESSSMForSequenceClassification,
    ESSSMModel,
    resolve_spectral_budget,
)

# Module-level so that tests (and tools) can route every Hub call elsewhere.
hub_api = HfApi(library_name="modeling_essm")

MODEL_CLASSES = {cls.__name__: cls for cls in (ESSSMModel, ESSSMForCausalLM, ESSSMForSequenceClassification)}
PIPELINE_TAGS = {ESSSMForCausalLM: "text-generation", ESSSMForSequenceClassification: "text-classification",
                 ESSSMModel: "feature-extraction"}
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
SWEEP_PLOT = "budget_sweep.png"
SWEEP_FILE = "budget_sweep.json"  # read by the explorer, which marks the chosen budget on the curve


# --- checks: all of them run before anything is written ------------------------------------------------


def check_repo_id(repo_id: str) -> str:
    """Usage code in the card names the repository, so it must be complete: 'owner/name'."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: give it with its owner, as 'owner/name'.")
    return repo_id


def load_saved_model(folder):
    """The ES-SSM saved in `folder` by `save_pretrained`, loaded as the class it was saved from."""
    folder = Path(folder)
    not_a_model = f"{str(folder)!r} is not a saved ES-SSM model folder"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{not_a_model}: it has no config.json (save one with model.save_pretrained(folder)).")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "essm":
        raise ValueError(f"{not_a_model}: its config.json has model_type={config.get('model_type')!r}, not 'essm'.")
    if not any((folder / name).is_file() for name in WEIGHTS_FILES):
        raise ValueError(f"{not_a_model}: it has no safetensors weights ({' or '.join(WEIGHTS_FILES)}).")
    architecture = (config.get("architectures") or ["ESSSMModel"])[0]
    if architecture not in MODEL_CLASSES:
        raise ValueError(f"{not_a_model}: unknown architecture {architecture!r}; expected one of {sorted(MODEL_CLASSES)}.")
    return MODEL_CLASSES[architecture].from_pretrained(folder).eval()


def load_tokenizer(folder):
    """The tokenizer saved next to the model, or None when the folder has none."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(folder)


def checked_budgets(budgets, config) -> list[int]:
    """The budgets of the compact exports: integers (a repository named <repo_id>-k<k> each)."""
    resolved = [resolve_spectral_budget(k, config) for k in budgets]
    if any(isinstance(k, list) for k in resolved):
        raise ValueError("compact exports take integer budgets; push a per-layer slice (slice_to_budget([...]) "
                         "saved to a folder) as a repository of its own")
    return sorted(set(resolved))


def compact_repo_id(repo_id: str, spectral_budget: int) -> str:
    return f"{repo_id}-k{spectral_budget}"


def load_sweep(path, config) -> dict:
    """A budget sweep written by `essm-eval-budgets` (budget_sweep.json), checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Budget sweep {str(path)!r} does not exist.")
    try:
        sweep = json.loads(path.read_text())
        rows = sweep["results"]
        budgets = [row["budget"] for row in rows]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{str(path)!r} is not a budget sweep (budget_sweep.json from essm-eval-budgets): "
                         f"{type(error).__name__}: {error}") from None
    if not rows:
        raise ValueError(f"Budget sweep {str(path)!r} has no results.")
    checked_budgets(budgets, config)  # a sweep of another model names budgets this one may not have
    return sweep


# --- the model card ------------------------------------------------------------------------------------


def example_budget(config) -> int:
    return max(config.min_spectral_budget, min(4, config.num_spectral_filters))


def usage_code(model, repo_id: str, has_tokenizer: bool) -> str:
    config, auto_class = model.config, type(model)._auto_class
    budget = example_budget(config)
    lines = ["import torch", f"from transformers import {auto_class}{', AutoTokenizer' if has_tokenizer else ''}", "",
             f'model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)']
    if has_tokenizer:
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
                  'inputs = tokenizer(["To be, or not to be"], return_tensors="pt")']
    elif config.input_size is not None:
        lines.append(f'inputs = {{"input_values": torch.randn(1, 100, {config.input_size})}}')
    else:
        lines.append(f'inputs = {{"input_ids": torch.randint(0, {config.vocab_size}, (1, 16))}}')
    lines += ["", f"# spectral_budget: the number of spectral channels to run, from {config.min_spectral_budget} "
              f"to {config.num_spectral_filters} (None: all)",
              f"outputs = model(**inputs, spectral_budget={budget})"]
    if model.can_generate():
        lines.append(f"generated = model.generate(**inputs, spectral_budget={budget}, max_new_tokens=20)")
        if has_tokenizer:
            lines.append("print(tokenizer.decode(generated[0]))")
    return "\n".join(lines)


def model_table(model) -> str:
    config = model.config
    rows = [("architecture", type(model).__name__),
            ("blocks x width", f"{config.num_hidden_layers} x {config.hidden_size}"),
            ("spectral channels K", f"{config.num_spectral_filters} (budgets {config.min_spectral_budget} to "
                                    f"{config.num_spectral_filters})"),
            ("longest sequence L", str(config.max_position_embeddings)),
            ("parameters", f"{model.num_parameters():,}")]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def sweep_section(sweep) -> str:
    from .evaluation import markdown_table  # the sweep's own report format; pulls in the training code

    settings = sweep.get("settings", {})
    command = settings.get("command")
    return "\n\n".join(filter(None, [
        "## Quality at every budget",
        f"One model, evaluated at each spectral budget k on {settings.get('task', 'its task')} "
        f"({settings.get('eval_samples', '?')} evaluation samples).",
        markdown_table(sweep["results"]),
        f"![Quality and cost at each spectral budget]({SWEEP_PLOT})",
        f"Reproduce: `{command}`" if command else None,
    ]))


def compact_section(compacts: dict) -> str:
    rows = [f"| {k} | [{repo_id}](https://huggingface.co/{repo_id}) | {model.num_parameters():,} |"
            for k, (repo_id, model) in compacts.items()]
    return "\n".join(["## Compact exports", "",
                      "Each is this model with the spectral channels above k removed (`model.slice_to_budget(k)`): "
                      "a smaller checkpoint whose outputs equal this model's at `spectral_budget=k`.", "",
                      "| budget k | repository | parameters |", "|---:|---|---:|", *rows])


def budget_eval_results(model, sweep) -> list[EvalResult]:
    """The sweep as model-index entries, one per budget, so that the Hub lists the quality at each budget."""
    settings = sweep.get("settings", {})
    task = settings.get("task", "evaluation data")
    task_type = "other" if model.config.input_size is not None else PIPELINE_TAGS[type(model)]  # as the pipeline tag
    results = []
    for row in sweep["results"]:
        metric = "accuracy" if "accuracy" in row else "bits_per_byte"
        results.append(EvalResult(task_type=task_type, dataset_type=task, dataset_name=task, metric_type=metric,
                                  metric_value=row[metric], metric_name=f"{metric} at spectral budget {row['budget']}",
                                  task_name=f"spectral budget {row['budget']}"))
    return results


def card_metadata(model, base_model=None, repo_id=None, sweep=None) -> ModelCardData:
    eval_results = budget_eval_results(model, sweep) if sweep else None
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=None if model.config.input_size is not None else PIPELINE_TAGS[type(model)],
        tags=["essm", "state-space-model", "spectral-budget", "custom_code"],
        base_model=base_model,
        model_name=repo_id.split("/")[1] if eval_results else None,
        eval_results=eval_results,
    )


def model_card(model, repo_id, has_tokenizer, sweep=None, compacts=None) -> ModelCard:
    """The card of a full model: what it is, how to run it at a budget, its sweep and its compact exports."""
    config = model.config
    sections = [
        f"# {repo_id.split('/')[1]}",
        "An Elastic Spectral State Space Model (ES-SSM, [arXiv 2601.22488](https://arxiv.org/abs/2601.22488)). "
        "Each block convolves its input with fixed spectral filters and mixes the results through a per-token "
        f"gate. It was trained once and runs at any **spectral budget** k from {config.min_spectral_budget} to "
        f"{config.num_spectral_filters}: the first k spectral channels, fewer FLOPs, the same weights.",
        model_table(model),
        "## Usage",
        f"```python\n{usage_code(model, repo_id, has_tokenizer)}\n```",
        "Every forward (and `generate`) takes `spectral_budget`; a value outside the range raises a `ValueError`. "
        "`model.slice_to_budget(k)` returns a smaller model that equals this one at budget k.",
        explorer_line(repo_id),
        sweep_section(sweep) if sweep else None,
        compact_section(compacts) if compacts else None,
    ]
    metadata = card_metadata(model, repo_id=repo_id, sweep=sweep).to_yaml()
    return ModelCard(f"---\n{metadata}\n---\n\n" + "\n\n".join(filter(None, sections)) + "\n")


def explorer_line(repo_id: str) -> str:
    return (f"Try every budget in your browser: `pip install 'modeling_essm[explore]'`, then `essm-explore {repo_id}` "
            "(generation or predictions at any budget, with the measured cost and the budget-quality curve); "
            f"`essm-explore {repo_id} --write-space DIR` writes a Hugging Face Space that serves the same page.")


def compact_model_card(compact, repo_id, parent_repo_id, parent_parameters, has_tokenizer) -> ModelCard:
    """The card of a compact export: the parent model sliced to its budget."""
    k = compact.config.num_spectral_filters
    sections = [
        f"# {repo_id.split('/')[1]}",
        f"The compact export of [{parent_repo_id}](https://huggingface.co/{parent_repo_id}) at spectral budget "
        f"k={k}: the same ES-SSM with the spectral channels above {k} removed (`slice_to_budget({k})`). Its outputs "
        f"equal the full model's at `spectral_budget={k}`, with {compact.num_parameters():,} parameters instead of "
        f"{parent_parameters:,}.",
        model_table(compact),
        "## Usage",
        f"```python\n{usage_code(compact, repo_id, has_tokenizer)}\n```",
        explorer_line(repo_id),
    ]
    metadata = card_metadata(compact, base_model=parent_repo_id).to_yaml()
    return ModelCard(f"---\n{metadata}\n---\n\n" + "\n\n".join(sections) + "\n")


# --- staging and pushing -------------------------------------------------------------------------------


def stage_repository(folder: Path, model, tokenizer, card: ModelCard, sweep=None) -> Path:
    """Write one repository's files into `folder`, as a user will download them."""
    model.save_pretrained(folder)  # config with auto_map, safetensors, generation config, modeling code
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card.save(folder / "README.md")
    if sweep:
        from .evaluation import plot_sweep

        (folder / SWEEP_FILE).write_text(json.dumps(sweep, indent=2) + "\n")
        plot_sweep(sweep["results"], folder / SWEEP_PLOT,
                   title=f"{sweep.get('settings', {}).get('task', 'quality')}: one model, every budget")
    return folder


def commit_folder(folder: Path, repo_id: str, commit_message: str, private=None, token=None):
    """Create the repository if needed and commit every file of `folder` to it in one commit."""
    hub_api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
                  for path in sorted(folder.rglob("*")) if path.is_file()]
    return hub_api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message, token=token)


def push_essm_to_hub(model_folder, repo_id, budgets=(), sweep=None, private=None, token=None,
                     commit_message="Upload ES-SSM") -> dict:
    """Push the model saved in `model_folder` to `repo_id`, and a compact export to `<repo_id>-k<k>` per budget.

    `sweep` is a budget_sweep.json from `essm-eval-budgets`; its table and plot go into the card.
    Returns {repo_id: commit url}.
    """
    check_repo_id(repo_id)
    model = load_saved_model(model_folder)
    budgets = checked_budgets(budgets, model.config)
    compact_ids = {k: check_repo_id(compact_repo_id(repo_id, k)) for k in budgets}
    sweep = load_sweep(sweep, model.config) if sweep is not None else None
    tokenizer = load_tokenizer(model_folder)
    has_tokenizer = tokenizer is not None

    compacts = {k: (compact_ids[k], model.slice_to_budget(k)) for k in budgets}
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        folders = {repo_id: stage_repository(staging / "full", model, tokenizer,
                                             model_card(model, repo_id, has_tokenizer, sweep, compacts), sweep)}
        for k, (compact_id, compact) in compacts.items():
            card = compact_model_card(compact, compact_id, repo_id, model.num_parameters(), has_tokenizer)
            folders[compact_id] = stage_repository(staging / f"k{k}", compact, tokenizer, card)
        return {target: commit_folder(folder, target, commit_message, private, token).commit_url
                for target, folder in folders.items()}


# --- a Space for the explorer ---------------------------------------------------------------------------


SPACE_APP = '''"""The ES-SSM budget explorer of {repo_id}, as a Hugging Face Space serves it.

Set the Space variable ESSM_MODEL to show another pushed ES-SSM.
"""

import os

from explorer import build_app, load_explored

MODEL = os.environ.get("ESSM_MODEL", {repo_id!r})
build_app(load_explored(MODEL), MODEL).launch()
'''


def space_requirements() -> str:
    """What the Space installs beside Gradio: this package's core requirements (the model's code comes with the
    model) and matplotlib for the curves."""
    core = [requirement for requirement in importlib.metadata.requires("modeling_essm") or ()
            if "extra ==" not in requirement]
    return "\n".join([*core, "matplotlib>=3.8"]) + "\n"


def space_card(repo_id: str) -> str:
    metadata = SpaceCardData(title=f"{repo_id.split('/')[1]} explorer", sdk="gradio",
                             sdk_version=importlib.metadata.version("gradio"), app_file="app.py", models=[repo_id],
                             tags=["essm", "spectral-budget"])
    return (f"---\n{metadata.to_yaml()}\n---\n\n# Budget explorer of [{repo_id}](https://huggingface.co/{repo_id})\n\n"
            "Move the spectral budget and see what the model gives and costs there: its output, the ms per token "
            "and the parameters in use, and its place on the budget-quality curve.\n")


def write_space(repo_id: str, folder) -> Path:
    """Write a Hugging Face Space that serves the explorer of the pushed model `repo_id` into `folder` (new or empty):
    app.py, explorer.py, requirements.txt and README.md, all at once. Push it with
    `hf upload --repo-type space OWNER/NAME FOLDER`."""
    check_repo_id(repo_id)
    destination = check_new_folder(folder, "--write-space")
    with written_atomically(destination) as staging:
        (staging / "app.py").write_text(SPACE_APP.format(repo_id=repo_id))
        shutil.copy2(Path(__file__).with_name("explorer.py"), staging / "explorer.py")
        (staging / "requirements.txt").write_text(space_requirements())
        (staging / "README.md").write_text(space_card(repo_id))
    return destination


def parse_budgets(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,8; got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="essm-push-to-hub",
        description="Push a saved ES-SSM (model.save_pretrained folder) to the Hub as a complete repository "
                    "with a budget model card; --budgets also pushes compact exports to <repo_id>-k<k>.",
    )
    parser.add_argument("model_folder", help="folder written by save_pretrained (a tokenizer saved in it is pushed too)")
    parser.add_argument("repo_id", help="target repository, as owner/name")
    parser.add_argument("--budgets", type=parse_budgets, default=[], metavar="K1,K2",
                        help="also push slice_to_budget(k) of each budget to <repo_id>-k<k>")
    parser.add_argument("--sweep", metavar="JSON", help="budget_sweep.json from essm-eval-budgets: table and plot in the card")
    parser.add_argument("--private", action="store_true", help="create new repositories as private")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument("--commit-message", default="Upload ES-SSM")
    args = parser.parse_args(argv)
    if args.sweep:
        require_extra(parser.prog, "train")  # the card's table is the sweep's own report format
    try:
        urls = push_essm_to_hub(args.model_folder, args.repo_id, args.budgets, args.sweep,
                                private=args.private or None, token=args.token, commit_message=args.commit_message)
    except ValueError as error:
        parser.error(str(error))
    for url in urls.values():
        print(url)


__all__ = ["push_essm_to_hub", "model_card", "main"]
