import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_trainer import free_port
from transformers import AutoModelForSequenceClassification

from modeling_essm import ESSSMConfig
from modeling_essm.cli import eval_budgets_main, train_main
from modeling_essm.training import budget_counts


REPO = Path(__file__).resolve().parents[1]
# The main command's config, shrunk to seconds.
TINY_SETTINGS = [
    "task.max_length=48",
    "task.min_length=20",
    "task.train_size=48",
    "task.eval_size=16",
    "model.hidden_size=16",
    "model.intermediate_size=0",
    "budget.warmup_steps=1",
    "training.max_steps=6",
    "training.per_device_train_batch_size=8",
    "training.warmup_steps=0",
    "training.logging_steps=2",
    "training.eval_steps=3",
    "training.save_steps=3",
]


def tiny_overrides(output_dir, *settings):
    """`--set` arguments for the tiny main-command settings, writing to output_dir."""
    settings = [*TINY_SETTINGS, f"training.output_dir={output_dir}", *settings]
    return [arg for setting in settings for arg in ("--set", setting)]


def run_script(name, *args):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_main_command_trains_then_sweeps_every_budget(tmp_path):
    output_dir = tmp_path / "listops"
    train_output = run_script("train.py", "configs/listops.yaml", *tiny_overrides(output_dir))
    assert "steps per training budget:" in train_output
    assert (output_dir / "checkpoint-6").is_dir() and (output_dir / "run_config.yaml").is_file()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert sum(budget_counts(state["log_history"]).values()) == 6

    sweep_output = run_script("eval_budgets.py", str(output_dir), "--batch-size", "8")
    assert "AutoModelForSequenceClassification.from_pretrained" in sweep_output
    assert "| budget k | accuracy | loss | parameters | tokens/s |" in sweep_output
    report = json.loads((output_dir / "budget_sweep.json").read_text())
    rows = report["results"]
    assert [row["budget"] for row in rows] == [2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_second"] > 0 for row in rows)
    parameters = [row["parameters"] for row in rows]
    assert parameters == sorted(set(parameters))
    assert (output_dir / "budget_sweep.md").read_text().count("\n|") == len(rows) + 2  # header, rule, rows
    assert (output_dir / "budget_sweep.png").stat().st_size > 0

    # What a user does next: reload through the Auto class and pick a budget per call.
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    input_ids = torch.tensor([[11, 2, 3, 15]])  # [MIN 1 2 ]
    with torch.no_grad():
        assert model(input_ids=input_ids, spectral_budget=2).logits.shape == (1, 10)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    output_dir = tmp_path / "listops"
    overrides = tiny_overrides(output_dir, "training.eval_strategy=no")
    train_main([str(REPO / "configs/listops.yaml"), *overrides, "--set", "training.max_steps=3"])
    train_main([str(REPO / "configs/listops.yaml"), *overrides, "--resume"])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert sum(budget_counts(state["log_history"]).values()) == 6  # 3 steps before the resume, 3 after


def test_accelerate_launch_trains_on_two_processes(tmp_path):
    output_dir = tmp_path / "listops"
    overrides = tiny_overrides(output_dir, "training.eval_strategy=no", "training.max_steps=3")
    # --multi_gpu selects accelerate's torchrun launcher; use_cpu in the config makes it a gloo run on CPU.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    result = subprocess.run([*launcher, str(REPO / "scripts" / "train.py"), str(REPO / "configs/listops.yaml"), *overrides],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # 48 examples in batches of 8 per process: 3 steps are one epoch with two processes, half of one with one.
    assert state["global_step"] == 3 and state["epoch"] == 1.0


def test_a_bad_allocator_request_ends_the_commands_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ESSM_REUSE_FREED_MEMORY", "yes")
    output_dir = tmp_path / "run"
    model_dir = tmp_path / "model"
    ESSSMConfig(num_spectral_filters=8).save_pretrained(model_dir)
    (model_dir / "run_config.yaml").write_text("task: {name: listops}\ntraining: {output_dir: x}\n")
    saved = sorted(model_dir.iterdir())
    cases = [(train_main, [str(REPO / "configs/listops.yaml"), *tiny_overrides(output_dir)], "essm-train"),
             (eval_budgets_main, [str(model_dir)], "essm-eval-budgets")]
    for command, args, prog in cases:
        with pytest.raises(SystemExit) as exit_status:
            command(args)
        assert exit_status.value.code == 2
        error = capsys.readouterr().err
        assert error == (f"{prog}: error: ESSM_REUSE_FREED_MEMORY must be 1 (keep freed memory for reuse) or 0 "
                         "(glibc's defaults, also when unset), got 'yes'.\n")
    assert not output_dir.exists() and sorted(model_dir.iterdir()) == saved  # no report written either


def test_user_errors_end_the_commands_with_one_line_and_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: listops}\ntraining: {output_dir: out, max_stepz: 3}\n")
    cases = [
        (train_main, [str(tmp_path / "missing.yaml")], "essm-train: error: run config not found"),
        (train_main, [str(bad)], "essm-train: error: invalid training section: "),
        (train_main, [str(bad), "--set", "training.max_stepz=1", "--set", "model.hidden_size=big"],
         "essm-train: error: ESSSMConfig.hidden_size must be a positive integer, got 'big'."),
        (eval_budgets_main, [str(tmp_path)], "essm-eval-budgets: error: " + str(tmp_path) + " has no run_config.yaml"),
    ]
    # A model folder's config decides the valid budgets, before the data or the weights load.
    ESSSMConfig(num_spectral_filters=8).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "run_config.yaml").write_text("task: {name: listops}\ntraining: {output_dir: x}\n")
    cases.append((eval_budgets_main, [str(tmp_path / "model"), "--budgets", "4", "9"],
                  r"essm-eval-budgets: error: --budgets: spectral_budget must be an integer in [2, 8]"))
    for command, args, message in cases:
        with pytest.raises(SystemExit) as exit_status:
            command(args)
        assert exit_status.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith(message) and error.count("\n") == 1, error
