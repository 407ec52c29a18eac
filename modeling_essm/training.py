"""Train an ES-SSM with budget dropout from a YAML run config.

A run config has four sections and an optional fifth:

    task:      arguments of `modeling_essm.tasks.load_task` (`name` required)
    model:     `ESSSMConfig` fields; the task fills vocab_size, input_size, num_labels, pad_token_id
               and (by default) max_position_embeddings
    budget:    `BudgetSampler` settings (schedule, grid, warmup_steps, full_every, fixed_budget, seed, bias,
               per_layer); K, the minimum and the number of layers come from the model
    training:  `transformers.TrainingArguments` (`output_dir` required)
    recipe:    optional `ESSSMTrainer` / `EMACallback` options: `decay_embeddings` (default true),
               `ema_decay` (default null: no average), `sandwich` (default false) and `distillation`
               (default true; with `sandwich` only)

Everything is built and checked before the first step, so a bad config fails in seconds.
"""

import gc
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import TrainingArguments, set_seed

from .budget import BudgetSampler, BudgetSamplingCallback
from .configuration_essm import ESSSMConfig
from .modeling_essm import ESSSMForCausalLM, ESSSMForSequenceClassification, resolve_spectral_budget
from .tasks import load_task, task_fields
from .trainer import EMACallback, ESSSMTrainer, SandwichRule


SECTIONS = ("task", "model", "budget", "training", "recipe")
# K, the minimum budget and the number of layers come from the model.
BUDGET_FIELDS = set(inspect.signature(BudgetSampler).parameters) - {"num_filters", "min_budget", "num_layers"}
RECIPE_DEFAULTS = {"decay_embeddings": True, "ema_decay": None, "sandwich": False, "distillation": True,
                   "eval_budgets": None}
# Filled from the task's data: a config that sets them differently would build a model that cannot read it.
TASK_MODEL_FIELDS = ("vocab_size", "input_size", "num_labels", "pad_token_id")
RUN_CONFIG_NAME = "run_config.yaml"
IGNORE_INDEX = -100


# ---- run config ----


class Yaml12Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans (only true/false): in YAML 1.1 `eval_strategy: no` would be False."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text):
    return yaml.load(text, Loader=Yaml12Loader)


class RunConfigError(ValueError):
    """A run config that cannot work, found before any data or model is built; commands print it as one line."""


def load_run_config(path, overrides=()):
    """Read a YAML run config, apply `section.key=value` overrides (values parsed as YAML) and check every section.

    Raises FileNotFoundError or RunConfigError before any data or model is built.
    """
    try:
        return read_run_config(Path(path), overrides)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from error


def read_run_config(path, overrides):
    if not path.is_file():
        raise FileNotFoundError(f"run config not found: {path}")
    try:
        config = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"malformed YAML in run config {path}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"run config {path} must be a mapping with sections {', '.join(SECTIONS)}")
    for override in overrides:
        apply_override(config, override)
    return check_run_config(config, source=path)


def apply_override(config, override):
    """`training.max_steps=20` -> config["training"]["max_steps"] = 20."""
    dotted, sep, value = override.partition("=")
    keys = dotted.split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ValueError(f"override {override!r} must look like section.key=value")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {key!r} is not a section")
    node[keys[-1]] = parse_yaml(value)


def check_run_config(config, source="run config"):
    if "optimizer" in config:
        raise ValueError(
            f"{source}: the optimizer section (spectral_proj_lr_scale) was replaced by the model field "
            "spectral_proj_multiplier, which every training loop sees (default 100; docs/training.md): remove the "
            "section, and set model.spectral_proj_multiplier only to override the default"
        )
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown sections {sorted(unknown)}; valid sections are {', '.join(SECTIONS)}")
    config = {section: config.get(section) or {} for section in SECTIONS}
    for section, values in config.items():
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping, got {values!r}")
    if "name" not in config["task"]:
        raise ValueError(f"{source}: task.name is required")
    if "output_dir" not in config["training"]:
        raise ValueError(f"{source}: training.output_dir is required")
    for section, fields in (("task", task_fields(config["task"]["name"])), ("budget", BUDGET_FIELDS)):
        unknown = sorted(set(config[section]) - fields)
        if unknown:  # caught here, before any data or model is built
            raise ValueError(f"{source}: unknown {section} fields {unknown}; valid fields are {', '.join(sorted(fields))}")
    data_dir = config["task"].get("data_dir")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"{source}: task.data_dir {data_dir!r} is not a directory")
    set_by_task = sorted(set(config["model"]) & set(TASK_MODEL_FIELDS))
    if set_by_task:
        raise ValueError(f"{source}: model fields {set_by_task} come from the task's data; remove them")
    config["recipe"] = check_recipe(config["recipe"], source)
    # ESSSMConfig only warns about unknown keyword arguments (transformers configs keep them): refuse them here.
    defaults = ESSSMConfig()
    unknown_fields = sorted(name for name in config["model"] if not hasattr(defaults, name))
    if unknown_fields:
        raise ValueError(f"{source}: unknown model fields {unknown_fields}; see ESSSMConfig for the valid ones")
    # Values, checked now on the fields the task does not set (it sets the vocabulary, labels and length).
    model_config = ESSSMConfig(**config["model"])
    build_sampler(config["budget"], model_config)
    for budget in config["recipe"]["eval_budgets"] or ():
        resolve_spectral_budget(budget, model_config)
    build_training_arguments(config["training"])
    return config


def check_recipe(recipe, source):
    """The recipe section with its defaults filled in; every value checked."""
    unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS))
    if unknown:
        raise ValueError(f"{source}: unknown recipe fields {unknown}; valid fields are {', '.join(RECIPE_DEFAULTS)}")
    recipe = {**RECIPE_DEFAULTS, **recipe}
    for name in ("decay_embeddings", "sandwich", "distillation"):
        if not isinstance(recipe[name], bool):
            raise ValueError(f"{source}: recipe.{name} must be true or false, got {recipe[name]!r}")
    decay = recipe["ema_decay"]
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1):
        raise ValueError(f"{source}: recipe.ema_decay must be null or a number in (0, 1), got {decay!r}")
    budgets = recipe["eval_budgets"]
    if budgets is not None and not isinstance(budgets, list):
        raise ValueError(f"{source}: recipe.eval_budgets must be null or a list of budgets, got {budgets!r}")
    return recipe


def save_tokenizer_for(task, output_dir):
    """Tasks whose inputs have a text form (bytes, ListOps expressions) save their tokenizer beside the model: the
    folder then works as it is, with a plain AutoTokenizer, for generate, pipelines, the explorer and a Hub push."""
    if task.build_tokenizer is not None:
        task.build_tokenizer().save_pretrained(output_dir)


def save_run_config(config, output_dir):
    path = Path(output_dir) / RUN_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- model and data ----


def build_model_config(model_section, task):
    fields = {"input_size": task.input_size, "pad_token_id": task.pad_token_id, "max_position_embeddings": task.max_length}
    # Real-valued inputs have no vocabulary and language modelling no labels: keep the config's defaults.
    if task.vocab_size is not None:
        fields["vocab_size"] = task.vocab_size
    if task.label_names is not None:
        fields["id2label"] = dict(enumerate(task.label_names))  # pipelines then answer with the names
    elif task.num_labels is not None:
        fields["num_labels"] = task.num_labels
    config = ESSSMConfig(**{**fields, **model_section})
    if config.max_position_embeddings < task.max_length:
        raise ValueError(
            f"model.max_position_embeddings={config.max_position_embeddings} is shorter than the task's "
            f"max_length={task.max_length}"
        )
    return config


def is_language_model(task):
    return task.metric == "bits_per_byte"


def model_class_for(task):
    return ESSSMForCausalLM if is_language_model(task) else ESSSMForSequenceClassification


@dataclass
class PaddingCollator:
    """Right-pads a list of unpadded examples into a batch with an attention mask.

    Token inputs (`input_ids`) pad with `pad_token_id`, real-valued ones (`input_values`) with zeros.
    For language modelling (`causal_lm=True`) the labels are the input ids themselves, padded with -100.
    """

    pad_token_id: int | None
    causal_lm: bool = False

    def __call__(self, features):
        key = "input_ids" if "input_ids" in features[0] else "input_values"
        sequences = [torch.as_tensor(f[key]) for f in features]
        lengths = torch.tensor([len(s) for s in sequences])
        positions = torch.arange(int(lengths.max()))
        attention_mask = (positions[None, :] < lengths[:, None]).long()
        # Real values pad with zeros; so do tokens of a task without a pad id (every image has 1,024 pixels),
        # where the attention mask would still mark any padding.
        padding_value = self.pad_token_id if key == "input_ids" and self.pad_token_id is not None else 0
        inputs = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=padding_value)
        inputs = inputs.long() if key == "input_ids" else inputs.float()
        batch = {key: inputs, "attention_mask": attention_mask}
        if self.causal_lm:
            batch["labels"] = inputs.masked_fill(attention_mask == 0, IGNORE_INDEX)
        elif "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch


def collator_for(task):
    return PaddingCollator(pad_token_id=task.pad_token_id, causal_lm=is_language_model(task))


# ---- metrics (offline, numpy) ----


def argmax_logits(logits, labels):
    # Keep only the predicted class during evaluation instead of every logit.
    return logits.argmax(dim=-1)


def compute_accuracy(eval_prediction):
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(labels)))}


def add_bits_per_byte(metrics, prefix="eval"):
    """Byte-level LM loss is in nats per byte; bits per byte is the same number in base 2."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_bits_per_byte"] = loss / math.log(2)
    return metrics


# ---- trainer ----


def build_sampler(budget_section, model_config):
    return BudgetSampler.from_config(model_config, **budget_section)


def build_training_arguments(training_section):
    try:
        return TrainingArguments(**training_section)
    except TypeError as error:
        raise ValueError(f"invalid training section: {error}") from error


def build_trainer(run_config, build_model=None):
    """Everything a run needs, built and checked before the first training step.

    `build_model(model_config, task)` trains another model in place of the ES-SSM that `model_config`
    describes (a baseline of the same size), with the same data and optimiser but no budget dropout.
    """
    args = build_training_arguments(run_config["training"])
    recipe = run_config["recipe"]
    task_section = dict(run_config["task"])
    task = load_task(task_section.pop("name"), **task_section)
    model_config = build_model_config(run_config["model"], task)
    sandwich = None
    set_seed(args.seed)  # the Trainer seeds only after the model exists: seed its initialisation too
    if build_model is None:
        sampler = build_sampler(run_config["budget"], model_config)
        model = model_class_for(task)(model_config)
        if recipe["sandwich"]:
            sandwich, callbacks = SandwichRule(sampler, distillation=recipe["distillation"]), []
        else:
            callbacks = [BudgetSamplingCallback(sampler)]
    else:
        model, callbacks = build_model(model_config, task), []
    if recipe["ema_decay"] is not None:
        callbacks.append(EMACallback(recipe["ema_decay"]))
    classification = task.metric == "accuracy"
    trainer = ESSSMTrainer(
        model=model,
        decay_embeddings=recipe["decay_embeddings"],
        sandwich=sandwich,
        eval_budgets=recipe["eval_budgets"] if build_model is None else None,  # baselines have no budgets
        args=args,
        train_dataset=task.train,
        eval_dataset=task.eval,
        data_collator=collator_for(task),
        compute_metrics=compute_accuracy if classification else None,
        preprocess_logits_for_metrics=argmax_logits if classification else None,
        callbacks=callbacks,
    )
    return trainer, task


def budget_counts(log_history):
    """Total steps per budget over a run, from the `budget_count_<k>` log entries."""
    totals = {}
    for entry in log_history:
        for key, count in entry.items():
            if key.startswith("budget_count_"):
                budget = int(key.removeprefix("budget_count_"))
                totals[budget] = totals.get(budget, 0) + count
    return dict(sorted(totals.items()))


def train(run_config, resume_from_checkpoint=None, build_model=None):
    """Train, evaluate at the full budget, and save the final model and its run config to `output_dir`.

    `build_model` replaces the ES-SSM, as in `build_trainer`.
    """
    trainer, task = build_trainer(run_config, build_model)
    output_dir = trainer.args.output_dir
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(output_dir)
    metrics = trainer.evaluate()
    if is_language_model(task):
        metrics = add_bits_per_byte(metrics)
    trainer.log_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        trainer.save_metrics("eval", metrics)
        trainer.save_state()
        save_run_config(run_config, output_dir)
        save_tokenizer_for(task, output_dir)
        counts = budget_counts(trainer.state.log_history)
        if counts:  # a baseline has no budgets
            unit = "layer-steps" if run_config["budget"].get("per_layer") else "steps"
            print(f"{unit} per training budget: " + ", ".join(f"k={k}: {n}" for k, n in counts.items()))
    return trainer, metrics


def close_process_group():
    """End a torchrun or accelerate run cleanly; a no-op in a single process.

    A finished Trainer still holds the process group through its DDP wrapper, inside reference
    cycles. Collect them first so the group really ends here: a gloo group that outlives the
    interpreter's shutdown aborts the process (about one run in six, in tests/test_budget.py).
    """
    if torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()
