"""FSDP2 training with budget dropout on two CPU processes (torchrun, gloo) against one process."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml
from tiny_trainer import free_port, tiny_model
from transformers import AutoModelForSequenceClassification, TrainingArguments

from modeling_essm.budget import BudgetSampler
from modeling_essm.sharded_training import LOG_NAME, parameter_groups, train_sharded
from modeling_essm.trainer import ESSSMTrainer
from modeling_essm.training import load_run_config

STEPS, PER_RANK = 6, 4
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # float32 sums in another order; measured differences ~1e-7


def write_config(folder, batch_size):
    config = {
        "task": {"name": "listops", "max_length": 48, "min_length": 20, "train_size": 64, "eval_size": 8},
        "model": {"hidden_size": 16, "num_hidden_layers": 2, "num_spectral_filters": 8, "intermediate_size": 0,
                  "bos_token_id": None, "eos_token_id": None},
        "budget": {"schedule": "uniform", "full_every": 0, "seed": 5},
        "training": {"output_dir": str(folder), "max_steps": STEPS, "per_device_train_batch_size": batch_size,
                     "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 3, "use_cpu": True, "report_to": []},
    }
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(config, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "modeling_essm.sharded_training", str(config), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def read_log(folder):
    return [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]


def one_process(config):
    """The same loop in this process, as a process group of one."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return train_sharded(load_run_config(config))
    finally:
        dist.destroy_process_group()


def test_two_sharded_processes_follow_one_process_resume_exactly_and_save_an_ordinary_model(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    torchrun(write_config(sharded, PER_RANK))
    two = read_log(sharded)
    one = one_process(write_config(single, 2 * PER_RANK))  # the same global batch of 8

    draws = [BudgetSampler("uniform", num_filters=8, full_every=0, seed=5)(step) for step in range(STEPS)]
    assert [entry["budgets_by_rank"] for entry in two] == [[k, k] for k in draws]  # every rank, every step
    assert [entry["step"] for entry in two] == list(range(1, STEPS + 1))
    torch.testing.assert_close([e["loss"] for e in two], [e["loss"] for e in one], **LOSS_TOLERANCE)

    sharded_model = AutoModelForSequenceClassification.from_pretrained(sharded).eval()
    single_model = AutoModelForSequenceClassification.from_pretrained(single).eval()
    x = torch.randint(1, 16, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sharded_model(x).logits, single_model(x).logits, rtol=1e-4, atol=1e-5)

    # Resume from the step-3 checkpoint, as if the run had stopped there: the last three steps again, exactly.
    (sharded / "model.safetensors").unlink()
    shutil.rmtree(sharded / f"checkpoint-{STEPS}")
    torchrun(sharded.with_suffix(".yaml"), "--resume")
    assert read_log(sharded) == two
    resumed = AutoModelForSequenceClassification.from_pretrained(sharded).eval()
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, sharded_model(x).logits)


def test_resume_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder in"):
        train_sharded(load_run_config(write_config(tmp_path / "empty", PER_RANK)), resume=True)
    assert not dist.is_initialized()  # refused before any work


def test_settings_the_loop_does_not_implement_are_refused_before_any_work(tmp_path):
    config = load_run_config(write_config(tmp_path / "run", PER_RANK),
                             ["recipe.ema_decay=0.99", "training.gradient_accumulation_steps=2"])
    with pytest.raises(ValueError, match="does not implement recipe.ema_decay, training.gradient_accumulation_steps"):
        train_sharded(config)
    assert not dist.is_initialized()


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_groups_are_the_trainers(decay_embeddings, tmp_path):
    model = tiny_model()
    trainer = ESSSMTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                           decay_embeddings=decay_embeddings)
    decayed, spared = parameter_groups(model, 0.1, decay_embeddings)
    named = dict(model.named_parameters())
    assert {id(p) for p in decayed["params"]} == {id(named[n]) for n in trainer.get_decay_parameter_names(model)}
    assert (decayed["weight_decay"], spared["weight_decay"]) == (0.1, 0.0)
    assert len(decayed["params"]) + len(spared["params"]) == len(named)
