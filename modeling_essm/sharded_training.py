"""Fully sharded data-parallel training (FSDP2) of an ES-SSM with budget dropout: `essm-train-sharded CONFIG`.

The transformers `Trainer` shards models through accelerate, which needs GPUs; this loop calls torch's
`fully_shard` directly (every block, then the whole model), so it runs on CPU processes (gloo) as well as
on GPUs (nccl). Launch it as any torchrun program:

    torchrun --nproc_per_node 2 -m modeling_essm.sharded_training configs/listops.yaml
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        -m modeling_essm.sharded_training configs/listops.yaml     # then node_rank 1 on the second machine

It reads the run configs of `essm-train` (docs/training.md): the task, model and budget sections, the
recipe's decay_embeddings, and from the training section output_dir, max_steps, per_device_train_batch_size,
learning_rate, weight_decay (not on biases and norms, as the Trainer), adam_beta1, adam_beta2, adam_epsilon,
lr_scheduler_type, warmup_steps, max_grad_norm, logging_steps, save_steps and seed. Settings it would not
honour (gradient accumulation, bf16/fp16, the EMA and sandwich recipes) are refused before any work. Step s trains the next world_size x per_device_train_batch_size examples of a seeded
shuffle, split across the ranks in rank order, at the budget the sampler draws for s on every rank; so N
processes follow the loss curve of one process with the same global batch (per-row losses: classifiers;
a causal LM's per-token mean weighs the ranks' tokens alike only when they hold as many).

Writes `log.jsonl` (loss, learning rate, and the budget every rank ran, at each logging step),
`checkpoint-<step>/` every save_steps and at the end unless save_strategy is "no" (sharded model and
optimizer through torch.distributed.checkpoint, for `--resume`, which may also train on to a larger max_steps),
and at the end the model as an ordinary `save_pretrained` folder with its run config (and the byte tokenizer
for text and LM tasks).
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch import nn
from transformers import get_scheduler, set_seed
from transformers.trainer_pt_utils import get_parameter_names

from .cli import add_override_argument
from .tasks import load_task
from .trainer import without_embeddings
from .training import build_model_config, build_sampler, build_training_arguments, collator_for, load_run_config, \
    model_class_for, save_run_config, save_tokenizer_for

LOG_NAME = "log.jsonl"
# The Trainer's rule for parameters without weight decay (Trainer.get_decay_parameter_names).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
STATE_NAME = "loop_state.pt"  # step and learning-rate schedule, beside the sharded checkpoint


def shard(model):
    """FSDP2 on every block and then the whole model: each rank keeps 1 / world_size of every parameter."""
    for block in model.model.layers:
        fully_shard(block)
    return fully_shard(model)


def check_supported(run_config, args):
    """Refuse what this loop does not implement, rather than train without it."""
    recipe = run_config["recipe"]
    unsupported = [name for name, used in (("recipe.ema_decay", recipe["ema_decay"] is not None),
                                           ("recipe.sandwich", recipe["sandwich"]),
                                           ("training.gradient_accumulation_steps", args.gradient_accumulation_steps != 1),
                                           ("training.bf16", args.bf16), ("training.fp16", args.fp16)) if used]
    if unsupported:
        raise ValueError(f"essm-train-sharded does not implement {', '.join(unsupported)}: remove them, or train "
                         "with essm-train (the Trainer)")


def parameter_groups(model, weight_decay, decay_embeddings):
    """AdamW groups as the Trainer builds them: decay on every weight but biases and norms (and embeddings, unless
    decay_embeddings is false)."""
    decayed = get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS)
    if not decay_embeddings:
        decayed = without_embeddings(model, decayed)
    named = list(model.named_parameters())
    return [{"params": [p for name, p in named if name in decayed], "weight_decay": weight_decay},
            {"params": [p for name, p in named if name not in decayed], "weight_decay": 0.0}]


def global_batches(dataset_size, batch_size, seed):
    """Example indices of the global batch of every step: epochs of a seeded shuffle, cut into full batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(dataset_size, generator=generator).tolist()
        for start in range(0, dataset_size - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def latest_checkpoint(output_dir):
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint-<step> folder in {output_dir}")
    return checkpoints[-1]


def save_checkpoint(path, model, optimizer, scheduler, step):
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    if dist.get_rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, Path(path) / STATE_NAME)
    dist.barrier()  # every rank's shard and the loop state are on disk before anyone moves on


def load_checkpoint(path, model, optimizer, scheduler) -> int:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loop_state = torch.load(Path(path) / STATE_NAME, weights_only=True)
    scheduler.load_state_dict(loop_state["scheduler"])
    return loop_state["step"]


def log_entry(step, loss, budget, learning_rate) -> dict:
    """The step's loss averaged over the ranks (the global batch's: equal rows per rank) and every rank's budget."""
    budgets = [None] * dist.get_world_size()
    dist.all_gather_object(budgets, budget)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
    return {"step": step, "loss": mean_loss.item(), "learning_rate": learning_rate, "budgets_by_rank": budgets}


def append_to_log(path, entry):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(entry) + "\n")
    print(entry, flush=True)


def truncate_log(path, step):
    """A resumed run continues the log from its checkpoint: drop what the interrupted run logged after it."""
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def train_sharded(run_config, resume=False):
    """Train with FSDP2 in the process group torchrun set up; returns the log entries (rank 0) or []."""
    args = build_training_arguments(run_config["training"])
    check_supported(run_config, args)
    output_dir = Path(args.output_dir)
    checkpoint = latest_checkpoint(output_dir) if resume else None  # before any data or model is built
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    task_section = dict(run_config["task"])
    task = load_task(task_section.pop("name"), **task_section)
    model_config = build_model_config(run_config["model"], task)
    sampler = build_sampler(run_config["budget"], model_config)
    set_seed(args.seed)  # the same initial weights on every rank, before sharding
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    model = shard(model_class_for(task)(model_config).to(device))
    model.train()
    groups = parameter_groups(model, args.weight_decay, run_config["recipe"]["decay_embeddings"])
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                              num_training_steps=args.max_steps)
    step = 0
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, model, optimizer, scheduler)
        if rank == 0:
            truncate_log(output_dir / LOG_NAME, step)
    batch_size = args.per_device_train_batch_size
    batches = global_batches(len(task.train), world_size * batch_size, args.seed)
    for _ in range(step):  # the batches a resumed run has already trained on
        next(batches)
    collate = collator_for(task)
    log = []
    while step < args.max_steps:
        rows = next(batches)[rank * batch_size : (rank + 1) * batch_size]
        batch = {name: value.to(device) for name, value in collate([task.train[i] for i in rows]).items()}
        budget = sampler(step)
        loss = model(**batch, spectral_budget=budget).loss
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        if step % args.logging_steps == 0 or step == args.max_steps:
            entry = log_entry(step, loss, budget, scheduler.get_last_lr()[0])  # a collective: every rank calls it
            if rank == 0:
                log.append(entry)
                append_to_log(output_dir / LOG_NAME, entry)
        if args.save_strategy != "no" and (step % args.save_steps == 0 or step == args.max_steps):
            save_checkpoint(output_dir / f"checkpoint-{step}", model, optimizer, scheduler, step)
    # Gathered into an ordinary model on rank 0: a folder any transformers code loads.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = model_class_for(task)(model_config)
        plain.load_state_dict(state)
        plain.save_pretrained(output_dir)
        save_run_config(run_config, output_dir)
        save_tokenizer_for(task, output_dir)
    dist.barrier()
    return log


def main(argv=None):
    parser = argparse.ArgumentParser(prog="essm-train-sharded", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML run config with task, model, budget and training sections")
    add_override_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    args = parser.parse_args(argv)
    run_config = load_run_config(args.config, args.overrides)
    try:
        train_sharded(run_config, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
