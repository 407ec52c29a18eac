r"""Training speed and memory as a user gets them: a plain `transformers.Trainer` in a plain Python process.

The reference ES-SSM LM (D=256, 8 layers, K=32, trained at its full budget) with the convolutions kept for
backward or recomputed (`spectral_recompute`; by default with the first channels' gated convolutions saved within
`spectral_saved_mb`, or with none saved), against the parameter-matched Llama (SDPA) and Mamba (with the
`mambapy` package's parallel scan) of scripts/bench_forward.py, and both ES-SSM paths once more with glibc keeping
freed memory for reuse (`reuse_freed_memory()`, the process-wide switch our commands turn on only when
ESSM_REUSE_FREED_MEMORY=1):

    python scripts/bench_training_speed.py --lengths 1024 --rounds 8 --steps 8 --systems "ES-SSM, recomputed" \
        "Llama (SDPA)" --references "Llama (SDPA)" --output speed_1024.json

(docs/performance.md lists the committed runs' commands).

Mamba's steps take 6 s to 2.7 minutes each on one CPU thread at 512 to 4,096 tokens (and 17 GB at 4,096);
`--systems` runs a subset. A round's systems are alive at once, so their memory adds up.

Each system and length runs in a fresh process with one thread: a Trainer on random byte sequences of that length,
in batches of `--batch-size` (default 1), AdamW; the first step is a warm-up and the median of the next `--steps`
step times is reported, with the peak resident memory the training added to the process (its high-water mark,
reset before training, less its size then). This machine's speed drifts by a quarter and more over seconds to
minutes, so the systems take turns step by step: in each round every system's process is started, and each waits
between its steps until the others have taken theirs, in an order rotated from step to step, so that no two steps
ever run at once and each system's steps lie between the others'. Each system's ratio to each of `--references` is
taken within a round before its median over `--rounds` rounds (fresh processes each), and step by step: each timed
step against the reference's step of the same turn, the median of these speed-ups and how many are at least 1.
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

SYSTEMS = {  # name: (model, ES-SSM config settings, reuse freed memory)
    "ES-SSM, kept": ("ES-SSM", dict(spectral_recompute=False), False),
    "ES-SSM, recomputed": ("ES-SSM", {}, False),  # the defaults
    "ES-SSM, recomputed, none saved": ("ES-SSM", dict(spectral_saved_mb=0), False),
    "ES-SSM, kept, reuse_freed_memory": ("ES-SSM", dict(spectral_recompute=False), True),
    "ES-SSM, recomputed, reuse_freed_memory": ("ES-SSM", {}, True),
    "Llama (SDPA)": ("Llama (SDPA)", {}, False),
    "Mamba (mambapy scan)": ("Mamba", {}, False),
}


def median_step_seconds(system: str, seq_len: int, batch_size: int, steps: int, output_dir: str,
                        turns=None) -> dict:
    """Runs in a fresh process: the median time of a Trainer step of `system` on `batch_size` sequences of
    `seq_len`, and every step's start and end on the machine's monotonic clock.

    turns: a connection to the process that takes turns (`interleaved_runs`): before each step this one says
    "ready" and waits for "go".
    """
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_forward import ESSM_REFERENCE, llama, mamba

    from modeling_essm import ESSSMConfig, ESSSMForCausalLM
    from modeling_essm.cpu_allocator import reuse_freed_memory

    torch.set_num_threads(1)
    name, settings, reuse = SYSTEMS[system]
    if reuse:
        reuse_freed_memory()
    torch.manual_seed(0)
    if name == "ES-SSM":
        model = ESSSMForCausalLM(ESSSMConfig(**ESSM_REFERENCE, max_position_embeddings=seq_len, **settings))
    elif name == "Mamba":
        # Without CUDA kernels transformers' Mamba backpropagates through a sequential scan; mambapy's is parallel.
        model = mamba(seq_len, use_mambapy=True)
    else:
        model = llama(seq_len)
    ids = torch.randint(0, 256, ((steps + 1) * batch_size, seq_len)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.intervals, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if turns is not None:
                turns.send("ready")
                turns.recv()
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            self.intervals.append((self.start, time.monotonic()))

    times = StepTimes()
    resident_before = reset_peak_resident()
    arguments = TrainingArguments(output_dir=output_dir, max_steps=steps + 1,
                                  per_device_train_batch_size=batch_size,
                                  learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no",
                                  logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model.train(), args=arguments, train_dataset=data, callbacks=[times]).train()
    seconds = statistics.median(end - start for start, end in times.intervals[1:])  # the first step warms up
    peak_growth = status_mb("VmHWM") - resident_before
    return {"system": system, "seq_len": seq_len, "batch_size": batch_size, "parameters": model.num_parameters(),
            "seconds_per_step": seconds, "tokens_per_s": batch_size * seq_len / seconds,
            "peak_resident_growth_mb": peak_growth, "step_intervals": times.intervals}


def run_taking_turns(turns, *settings):
    """A process of `interleaved_runs`: trains as `median_step_seconds` does, then sends back its result."""
    turns.send(median_step_seconds(*settings, turns=turns))


def interleaved_runs(systems: list[str], seq_len: int, batch_size: int, steps: int, output_dir: str) -> list[dict]:
    """One run of every system, each in a fresh process of its own (no allocator history, no switch carried over),
    taking turns: each step of each system runs while the others wait between their steps, in an order rotated
    from step to step. Returns the runs in the order of `systems`."""
    context = multiprocessing.get_context("spawn")
    connections, processes, runs = [], [], [None] * len(systems)
    try:
        for index, system in enumerate(systems):
            ours, theirs = context.Pipe()
            settings = (system, seq_len, batch_size, steps, f"{output_dir}/{index}")
            process = context.Process(target=run_taking_turns, args=(theirs, *settings), daemon=True)
            process.start()
            processes.append(process)
            connections.append(ours)
        for connection in connections:
            connection.recv()  # "ready": built, and waiting at its first step
        for step in range(steps + 1):  # the warm-up and the timed steps
            for index in rotated(list(range(len(systems))), step):
                connections[index].send("go")
                reply = connections[index].recv()  # "ready" at its next step, or its result after the last one
                if step == steps:
                    runs[index] = reply
    except EOFError:
        raise RuntimeError(f"a system's process ended without its result (L={seq_len}): see its error above") from None
    finally:
        for process in processes:
            if None in runs:  # cut short: the others would wait for turns that do not come
                process.terminate()
            process.join()
    return runs


def status_mb(field: str) -> float:
    """A memory field of the calling process's /proc status (Linux), such as VmRSS or VmHWM, in MB."""
    with open("/proc/self/status") as status:
        kilobytes = next(line.split()[1] for line in status if line.startswith(field + ":"))
    return int(kilobytes) / 1024


def reset_peak_resident() -> float:
    """Sets the process's resident high-water mark (VmHWM) to its resident memory now, which it returns in MB, so
    that the peak read later is training's and not the model construction's."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_mb("VmRSS")


def rotated(order: list, turn: int) -> list:
    """`order` as turn `turn` takes it: each turn starts one item later than the one before."""
    shift = turn % len(order)
    return order[shift:] + order[:shift]


def step_speedups(run: dict, reference: dict) -> list[float]:
    """The reference's time over the run's for each timed step, paired by turn: the steps of one turn ran one right
    after the other, so the machine's drift between them is smallest."""
    return [(reference_end - reference_start) / (end - start)
            for (start, end), (reference_start, reference_end) in zip(run["step_intervals"][1:],
                                                                       reference["step_intervals"][1:])]


def summarize(runs: list[dict], references: list[str]) -> list[dict]:
    """One row per system and length from the runs of every round: medians over rounds of the step time, tokens/s
    and peak growth, and for each of `references` the median (and range) over rounds of tokens/s divided by that
    reference's in the same round, and over every timed step, its speed-up on the reference's step of the same
    turn: their median and how many are at least 1."""
    rows = []
    for seq_len in dict.fromkeys(run["seq_len"] for run in runs):
        at_length = [run for run in runs if run["seq_len"] == seq_len]
        by_round = {(run["system"], run["round"]): run for run in at_length}
        for system in dict.fromkeys(run["system"] for run in at_length):
            own = [run for run in at_length if run["system"] == system]
            row = {"system": system, "seq_len": seq_len, "parameters": own[0]["parameters"], "rounds": len(own)}
            for key in ("seconds_per_step", "tokens_per_s", "peak_resident_growth_mb"):
                row[key] = statistics.median(run[key] for run in own)
            row["ratios"] = {}
            for reference in references:
                paired = [(run, by_round[reference, run["round"]]) for run in own
                          if (reference, run["round"]) in by_round]
                if not paired or reference == system:
                    continue
                per_round = [run["tokens_per_s"] / theirs["tokens_per_s"] for run, theirs in paired]
                per_step = [speedup for run, theirs in paired for speedup in step_speedups(run, theirs)]
                row["ratios"][reference] = {"median": statistics.median(per_round),
                                            "range": [min(per_round), max(per_round)],
                                            "steps": {"median": statistics.median(per_step),
                                                      "at_least_1": sum(speedup >= 1 for speedup in per_step),
                                                      "pairs": len(per_step)}}
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every system per length (default: 3)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--references", nargs="+", default=["Llama (SDPA)"], choices=list(SYSTEMS),
                        help="the systems the others' tokens/s are divided by, round by round, when they run")
    parser.add_argument("--output", help="write the rows and every run as JSON here")
    parser.add_argument("--trainer-dir", default="/tmp/bench_training_speed", help="the Trainer's output_dir (nothing is saved)")
    args = parser.parse_args()
    if min(args.batch_size, args.steps, args.rounds) < 1:
        parser.error(f"--batch-size, --steps and --rounds must be at least 1, got {args.batch_size}, {args.steps} "
                     f"and {args.rounds}")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist")  # found now, not after the runs
    if len(set(args.systems)) < len(args.systems):
        parser.error(f"--systems lists a system twice: {args.systems}")
    runs = []
    for seq_len in args.lengths:
        for round_index in range(args.rounds):
            round_runs = interleaved_runs(args.systems, seq_len, args.batch_size, args.steps, args.trainer_dir)
            runs += [run | {"round": round_index} for run in round_runs]
            if args.output:  # after every round: a run cut short keeps what it measured
                write_report(args.output, vars(args), runs)
            for run in round_runs:
                print(f"L={seq_len:>5} round {round_index} {run['system']:40} {run['parameters'] / 1e6:6.2f}M params  "
                      f"{run['seconds_per_step']:6.2f} s/step  {run['tokens_per_s']:7.0f} tokens/s  "
                      f"peak +{run['peak_resident_growth_mb']:6.0f} MB", flush=True)
    for row in summarize(runs, args.references):
        ratios = "".join(f"  {ratio['median']:.2f}x {name} (steps {ratio['steps']['median']:.2f}x, "
                         f"{ratio['steps']['at_least_1']}/{ratio['steps']['pairs']} >= 1)"
                         for name, ratio in row["ratios"].items())
        print(f"L={row['seq_len']:>5} {row['system']:40} {row['tokens_per_s']:7.0f} tokens/s{ratios}")


def write_report(path: str, settings: dict, runs: list[dict]):
    """The settings, the summary rows and every run as JSON at `path`, replaced whole (written aside, then renamed)."""
    report = {"settings": settings, "rows": summarize(runs, settings["references"]), "runs": runs}
    partial = Path(path).with_name(Path(path).name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    main()
