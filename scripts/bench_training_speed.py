"""Training speed as a user gets it: a plain `transformers.Trainer` in a plain Python process.

The reference ES-SSM LM (D=256, 8 layers, K=32, trained at its full budget) with the convolutions kept for
backward or recomputed (`spectral_recompute`), against the parameter-matched Llama (SDPA) and Mamba (with the
`mambapy` package's parallel scan) of scripts/bench_forward.py, and both ES-SSM paths once more with glibc keeping
freed memory for reuse (`reuse_freed_memory()`, the process-wide switch our commands turn on):

    python scripts/bench_training_speed.py --lengths 1024 2048 4096 --output docs/training_speed.json

Mamba's steps take 36 s to 2.2 minutes each on one CPU thread at these lengths; `--systems` runs a subset.

Each system and length runs in a fresh process with one thread: a Trainer on random byte sequences of that length,
batch 1, AdamW; the first step is a warm-up and the median of the next `--steps` step times is reported.
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

SYSTEMS = {  # name: (model, spectral_recompute, reuse freed memory)
    "ES-SSM, kept": ("ES-SSM", False, False),
    "ES-SSM, recomputed": ("ES-SSM", True, False),
    "ES-SSM, kept, reuse_freed_memory": ("ES-SSM", False, True),
    "ES-SSM, recomputed, reuse_freed_memory": ("ES-SSM", True, True),
    "Llama (SDPA)": ("Llama (SDPA)", False, False),
    "Mamba (mambapy scan)": ("Mamba", False, False),
}


def median_step_seconds(system: str, seq_len: int, steps: int, output_dir: str) -> dict:
    """Runs in a fresh process: the median time of a Trainer step of `system` at `seq_len`."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_forward import ESSM_REFERENCE, llama, mamba

    from modeling_essm import ESSSMConfig, ESSSMForCausalLM
    from modeling_essm.cpu_allocator import reuse_freed_memory

    torch.set_num_threads(1)
    name, recompute, reuse = SYSTEMS[system]
    if reuse:
        reuse_freed_memory()
    torch.manual_seed(0)
    if name == "ES-SSM":
        model = ESSSMForCausalLM(ESSSMConfig(**ESSM_REFERENCE, max_position_embeddings=seq_len,
                                             spectral_recompute=recompute))
    elif name == "Mamba":
        # Without CUDA kernels transformers' Mamba backpropagates through a sequential scan; mambapy's is parallel.
        model = mamba(seq_len, use_mambapy=True)
    else:
        model = llama(seq_len)
    ids = torch.randint(0, 256, (steps + 1, seq_len)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    times = StepTimes()
    arguments = TrainingArguments(output_dir=output_dir, max_steps=steps + 1, per_device_train_batch_size=1,
                                  learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no",
                                  logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model.train(), args=arguments, train_dataset=data, callbacks=[times]).train()
    seconds = statistics.median(times.seconds[1:])  # the first step warms up
    return {"system": system, "seq_len": seq_len, "parameters": model.num_parameters(), "seconds_per_step": seconds,
            "tokens_per_s": seq_len / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (default: 3)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--trainer-dir", default="/tmp/bench_training_speed", help="the Trainer's output_dir (nothing is saved)")
    args = parser.parse_args()
    rows = []
    context = multiprocessing.get_context("spawn")  # a fresh process: no allocator history, no switch carried over
    for seq_len in args.lengths:
        for system in args.systems:
            with context.Pool(1) as pool:
                row = pool.apply(median_step_seconds, (system, seq_len, args.steps, args.trainer_dir))
            rows.append(row)
            print(f"L={seq_len:>5} {system:34} {row['parameters'] / 1e6:6.2f}M params  "
                  f"{row['seconds_per_step']:6.2f} s/step  {row['tokens_per_s']:7.0f} tokens/s", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
