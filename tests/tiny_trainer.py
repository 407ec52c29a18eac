"""A tiny ES-SSM classifier and Trainer for the budget-dropout tests.

Also the per-rank worker of the torchrun test: `torchrun --nproc_per_node 2 tests/tiny_trainer.py OUT_DIR`
trains with budget dropout and writes, for this rank, the budget every training forward pass saw.
"""

import json
import os
import random
import socket
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from modeling_essm import ESSSMConfig, ESSSMForSequenceClassification
from modeling_essm.budget import BudgetSampler, BudgetSamplingCallback
from modeling_essm.training import PaddingCollator, close_process_group


NUM_FILTERS = 8


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = ESSSMConfig(
        vocab_size=16,
        hidden_size=16,
        num_hidden_layers=2,
        num_spectral_filters=NUM_FILTERS,
        max_position_embeddings=32,
        intermediate_size=0,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return ESSSMForSequenceClassification(config)


def tiny_dataset(size=64, seed=0):
    rng = random.Random(seed)
    input_ids = [[rng.randrange(1, 16) for _ in range(rng.randrange(8, 32))] for _ in range(size)]
    return Dataset.from_dict({"input_ids": input_ids, "labels": [ids[0] % 3 for ids in input_ids]})


def tiny_trainer(output_dir, sampler=None, callbacks=(), model=None, **training_args):
    """A CPU Trainer with budget dropout; `training_args` override the small defaults."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    settings.update(training_args)
    sampler = sampler or BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    return Trainer(
        model=model or tiny_model(),
        args=TrainingArguments(**settings),
        train_dataset=tiny_dataset(),
        eval_dataset=tiny_dataset(16, seed=1),
        data_collator=PaddingCollator(pad_token_id=0),
        callbacks=[BudgetSamplingCallback(sampler), *callbacks],
    )


def record_budgets(trainer):
    """(global step, training?, spectral_budget) of every forward pass of the trainer's model, as the model sees it."""
    records = []

    def record(module, args, kwargs, output):
        records.append((trainer.state.global_step, module.training, kwargs.get("spectral_budget")))

    # A forward hook runs after every pre-hook, so it sees the kwargs the callback's pre-hook set.
    trainer.model.register_forward_hook(record, with_kwargs=True)
    return records


def free_port():
    """A free TCP port for a test's torchrun or accelerate rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(output_dir):
    trainer = tiny_trainer(output_dir, max_steps=6, gradient_accumulation_steps=2)
    records = record_budgets(trainer)
    trainer.train()
    result = {"world_size": trainer.args.world_size, "parallel_mode": str(trainer.args.parallel_mode), "records": records}
    Path(output_dir, f"budgets_rank{os.environ['RANK']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
    close_process_group()
