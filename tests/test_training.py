import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, Trainer

from modeling_essm.tasks import TaskData, listops
from modeling_essm.training import (
    PaddingCollator,
    add_bits_per_byte,
    build_model_config,
    build_trainer,
    load_run_config,
    train,
)


def write_config(tmp_path, **sections):
    config = {
        "task": {"name": "listops", "max_length": 48, "min_length": 20, "train_size": 16, "eval_size": 8},
        "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_spectral_filters": 8, "intermediate_size": 0},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "use_cpu": True, "report_to": []},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fake_task(**fields):
    settings = dict(name="fake", train=None, eval=None, num_labels=10, vocab_size=16, input_size=None,
                    pad_token_id=0, max_length=64, metric="accuracy")
    return TaskData(**{**settings, **fields})


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path)
    overrides = ["training.max_steps=7", "budget.grid=[2, 4, 8]", "model.hidden_dropout=0.1", "training.eval_strategy=no"]
    config = load_run_config(path, overrides + ["training.use_cpu=true"])
    assert config["training"]["max_steps"] == 7
    assert config["training"]["eval_strategy"] == "no"  # YAML 1.2: only true/false are booleans
    assert config["training"]["use_cpu"] is True
    assert config["budget"]["grid"] == [2, 4, 8]
    assert config["model"]["hidden_dropout"] == 0.1


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("task: {name: listops\ntraining: [", ValueError, "malformed YAML in run config"),
        ("- just\n- a list\n", ValueError, "must be a mapping with sections task, model, budget, training"),
        ("task: {name: listops}\ntrainer: {}\n", ValueError, r"unknown sections \['trainer'\]"),
        ("task: {max_length: 64}\ntraining: {output_dir: x}\n", ValueError, "task.name is required"),
        ("task: {name: listops}\n", ValueError, "training.output_dir is required"),
        ("task: {name: listops}\nmodel: [1]\ntraining: {output_dir: x}\n", ValueError, "section 'model' must be a mapping"),
        ("task: {name: listops}\nmodel: {vocab_size: 5}\ntraining: {output_dir: x}\n", ValueError, "come from the task"),
        ("task: {name: listops}\nmodel: {hiden_size: 5}\ntraining: {output_dir: x}\n", ValueError, r"unknown model fields \['hiden_size'\]"),
        ("task: {name: text, data_dir: /no/such/data}\ntraining: {output_dir: x}\n", FileNotFoundError, "/no/such/data"),
    ],
)
def test_bad_config_files_give_clear_errors(tmp_path, text, error, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_run_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run config not found"):
        load_run_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"budget": {"schedule": "cosine"}}, "unknown budget schedule 'cosine'; valid schedules are paper, uniform, fixed"),
        ({"budget": {"grid": [2, 4, 16]}}, r"budget grid value 16 is outside \[min_budget, num_filters\] = \[2, 8\]"),
        ({"training": {"max_stepz": 3}}, "invalid training section"),
        ({"task": {"max_length": 48}, "model": {"max_position_embeddings": 32}}, "shorter than the task's max_length=48"),
        ({"optimizer": {"spectral_proj_lr_scale": 100}}, "replaced by the model field spectral_proj_multiplier"),
        ({"budget": {"warmup_step": 5}}, r"unknown budget fields \['warmup_step'\]; valid fields are bias, fixed_budget"),
        ({"task": {"max_lenght": 40}}, r"unknown task fields \['max_lenght'\]; valid fields are data_dir, eval_size"),
        ({"task": {"name": "listop"}}, "unknown task 'listop'; valid tasks: listops, text"),
        ({"recipe": {"ema": 0.9}}, r"unknown recipe fields \['ema'\]"),
        ({"recipe": {"ema_decay": 1.0}}, r"recipe.ema_decay must be null or a number in \(0, 1\), got 1.0"),
        ({"recipe": {"sandwich": "yes"}}, "recipe.sandwich must be true or false, got 'yes'"),
        ({"recipe": {"eval_budgets": 4}}, "recipe.eval_budgets must be null or a list of budgets, got 4"),
        ({"recipe": {"eval_budgets": [4, 9]}}, r"spectral_budget must be an integer in \[2, 8\].*got 9"),
        ({"model": {"spectral_proj_multiplier": 0}}, "spectral_proj_multiplier must be a positive number, got 0"),
        ({"model": {"embedding_dropout": 1.5}}, r"embedding_dropout must be a number in \[0, 1\), got 1.5"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, monkeypatch, sections, message):
    def training_started(*args, **kwargs):
        raise AssertionError("training started despite a bad config")

    monkeypatch.setattr(Trainer, "train", training_started)
    with pytest.raises(ValueError, match=message):
        train(load_run_config(write_config(tmp_path, **sections)))
    assert not (tmp_path / "run").exists()


def test_build_trainer_wires_task_model_and_sampler(tmp_path):
    trainer, task = build_trainer(load_run_config(write_config(tmp_path, budget={"schedule": "fixed", "fixed_budget": 3})))
    config = trainer.model.config
    assert (config.vocab_size, config.num_labels, config.pad_token_id) == (task.vocab_size, 10, task.pad_token_id)
    assert config.max_position_embeddings == task.max_length == 48
    sampler = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "sampler")).sampler
    assert sampler.num_filters == 8 and sampler(0) == 3


def test_model_config_takes_its_shape_from_the_task():
    config = build_model_config({"hidden_size": 16, "num_spectral_filters": 4}, fake_task(input_size=1, vocab_size=None))
    assert (config.input_size, config.num_labels, config.max_position_embeddings) == (1, 10, 64)
    longer = build_model_config({"max_position_embeddings": 128, "num_spectral_filters": 4}, fake_task())
    assert longer.max_position_embeddings == 128


def test_padding_collator_pads_tokens_values_and_lm_labels():
    tokens = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 1}])
    assert tokens["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert tokens["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tokens["labels"].tolist() == [2, 1]

    values = PaddingCollator(pad_token_id=None)([{"input_values": [0.5, -0.5], "labels": 0}, {"input_values": [1.0], "labels": 3}])
    assert values["input_values"].dtype == torch.float32
    assert values["input_values"].tolist() == [[0.5, -0.5], [1.0, 0.0]]

    lm = PaddingCollator(pad_token_id=256, causal_lm=True)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert lm["input_ids"].tolist() == [[1, 2, 3], [4, 256, 256]]
    assert lm["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def test_padding_collator_batches_tokens_of_a_task_without_pad_id():
    pixels = PaddingCollator(pad_token_id=None)([{"input_ids": [0, 255], "labels": 1}, {"input_ids": [7, 0], "labels": 4}])
    assert pixels["input_ids"].tolist() == [[0, 255], [7, 0]]
    assert pixels["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_bits_per_byte_is_the_loss_in_base_two():
    assert add_bits_per_byte({"eval_loss": math.log(2) * 1.5})["eval_bits_per_byte"] == pytest.approx(1.5)


def test_the_paper_reference_config_trains_at_a_reduced_length(tmp_path, stand_in_shakespeare):
    overrides = ["task.max_length=128", "task.train_size=4", "task.eval_size=2", "training.max_steps=2",
                 "training.per_device_train_batch_size=2", "training.eval_strategy=no", "training.save_strategy=no",
                 f"training.output_dir={tmp_path / 'paper'}", "training.use_cpu=true", "training.report_to=[]"]
    config = load_run_config(Path(__file__).parents[1] / "configs" / "paper_lm.yaml", overrides)
    trainer, metrics = train(config)
    model = trainer.model
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_spectral_filters) == (256, 8, 32)
    assert (model.config.embedding_dropout, model.config.hidden_dropout, model.config.drop_path_rate) == (0.1, 0.1, 0.05)
    assert trainer.decay_embeddings is False
    assert any(type(callback).__name__ == "EMACallback" for callback in trainer.callback_handler.callbacks)
    assert trainer.lr_scheduler.lr_lambdas[0](2) == pytest.approx(0.1, abs=0.02)  # cosine ends at 10% of the peak
    assert math.isfinite(metrics["eval_bits_per_byte"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "paper")  # saved beside the LM, no remote code needed
    assert tokenizer("To be").input_ids == list(b"To be")


def test_the_same_config_and_seed_give_identical_weights_and_logs(tmp_path):
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        path = write_config(folder, training={"max_steps": 4, "logging_steps": 1, "seed": 3, "disable_tqdm": True},
                            model={"hidden_dropout": 0.1})  # dropout draws random numbers at every step too
        trainer, _ = train(load_run_config(path))
        logs = [{key: value for key, value in entry.items() if "runtime" not in key and "per_second" not in key}
                for entry in trainer.state.log_history]
        runs.append((trainer.model.state_dict(), logs))
    (first_weights, first_logs), (second_weights, second_logs) = runs
    assert first_logs == second_logs
    saved = tmp_path / "first" / "run"
    expression = "[MAX 2 9 [MIN 4 7 ] 0 ]"  # ListOps saves its own tokenizer: the folder reads expressions as text
    assert AutoTokenizer.from_pretrained(saved)(expression).input_ids == listops.encode(expression)
    assert AutoConfig.from_pretrained(saved).id2label[9] == "9"
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
