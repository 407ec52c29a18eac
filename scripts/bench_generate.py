"""Per-token decode latency and peak memory of cached generation: ES-SSM (FutureFill and naive caches) at
several spectral budgets against LlamaForCausalLM (SDPA, KV cache) and MambaForCausalLM (pure-PyTorch path)
at matched parameter counts, all in one run on the same machine.

For each model and context length: one prefill of `context` random bytes, then windows of `steps` decoding
steps (one token per forward call), each started from a copy of the prefilled cache. The default 256 steps
span whole FutureFill epochs at every context (E = 64, 128, 256 at 512, 2048, 8192), slow steps that compute
an epoch's future included, so ES-SSM's per-token time is the amortised one. Reported: the median over
windows of the mean per-token time (after a warm-up), the slowest single step, the prefill time, the peak
RSS of the prefill and one window above the level before them, and the size of the cache after a window.

    python scripts/bench_generate.py  # writes docs/bench_generate.json and docs/bench_generate.md
"""

import argparse
import copy
import ctypes
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from modeling_essm import ESSSMConfig, ESSSMForCausalLM
from modeling_essm.cache_essm import ESSSMCache


def memory_mb() -> tuple[float, float]:
    """(peak RSS since the last reset, current RSS) of this process in MiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    peak, current = (int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024 for key in ("VmHWM", "VmRSS"))
    return peak, current


def reset_peak_memory() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed by an earlier run would otherwise be reused unseen
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def tensor_mb(obj) -> float:
    """MiB held by the tensors reachable from a cache object (its attributes, lists and dicts)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += item.untyped_storage().nbytes()
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return total / 2**20


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(max_length: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    essm = ESSSMForCausalLM(ESSSMConfig(hidden_size=256, num_hidden_layers=8, num_spectral_filters=32,
                                        max_position_embeddings=max_length)).eval()
    target = num_parameters(essm)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1152, max_position_embeddings=max_length, tie_word_embeddings=True,
        attn_implementation="sdpa")).eval()
    mamba = MambaForCausalLM(MambaConfig(vocab_size=259, hidden_size=512, num_hidden_layers=13, state_size=16,
                                         tie_word_embeddings=True)).eval()
    for name, model in (("llama", llama), ("mamba", mamba)):
        ratio = num_parameters(model) / target
        if not 0.9 <= ratio <= 1.1:
            raise RuntimeError(f"{name} has {num_parameters(model)} parameters, {ratio:.2f}x ES-SSM's {target}")
    return {"essm": essm, "llama": llama, "mamba": mamba}


@torch.no_grad()
def decode(model, cache, tokens: torch.Tensor, forward_kwargs: dict) -> list[tuple[float, float]]:
    """Feed `tokens` (1, n) one per forward call; return each call's (wall, process CPU) seconds."""
    times = []
    for i in range(tokens.shape[1]):
        wall, cpu = time.perf_counter(), time.process_time()
        model(tokens[:, i : i + 1], cache=cache, use_cache=True, **forward_kwargs)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


class Run:
    """One model at one context: prefill once, then decoding windows from copies of the prefilled cache."""

    def __init__(self, name: str, model, context: int, steps: int, forward_kwargs: dict, future_fill=True):
        self.name, self.model, self.context, self.kwargs = name, model, context, forward_kwargs
        self.future_fill = future_fill
        generator = torch.Generator().manual_seed(context)
        self.prompt = torch.randint(0, 256, (1, context), generator=generator)
        self.tokens = torch.randint(0, 256, (1, steps), generator=generator)
        self.windows = []

    @torch.no_grad()
    def prefill(self, ids):
        cache = None if self.future_fill else ESSSMCache(self.model.config, future_fill=False)  # else the model's own
        return self.model(ids, cache=cache, use_cache=True, logits_to_keep=1, **self.kwargs).cache

    def start(self) -> None:
        """Warm up, prefill and decode the first window, measuring the prefill time and the peak memory."""
        decode(self.model, self.prefill(self.prompt[:, :64]), self.tokens[:, :8], self.kwargs)
        reset_peak_memory()
        _, before = memory_mb()
        start = time.perf_counter()
        cache = self.prefill(self.prompt)
        self.prefill_s = time.perf_counter() - start
        self.snapshot = copy.deepcopy(cache)  # the prefilled state, for the other windows
        self.windows.append(decode(self.model, cache, self.tokens, self.kwargs))
        peak, _ = memory_mb()
        self.peak_mb = peak - before - tensor_mb(self.snapshot)  # prefill and one window, without the snapshot
        self.cache_mb = tensor_mb(cache)  # after a window: FutureFill's buffers and grown capacities count too

    def window(self) -> None:
        self.windows.append(decode(self.model, copy.deepcopy(self.snapshot), self.tokens, self.kwargs))

    def result(self) -> dict:
        def median(values):
            return sorted(values)[len(values) // 2]

        return {
            "model": self.name, "context": self.context, "steps": self.tokens.shape[1], "windows": len(self.windows),
            "per_token_ms": 1e3 * median([sum(wall for wall, _ in times) / len(times) for times in self.windows]),
            "cpu_per_token_ms": 1e3 * median([sum(cpu for _, cpu in times) / len(times) for times in self.windows]),
            "slowest_step_ms": 1e3 * median([max(wall for wall, _ in times) for times in self.windows]),
            "prefill_s": self.prefill_s, "peak_mb": self.peak_mb, "cache_mb": self.cache_mb,
            **self.kwargs, "future_fill": self.future_fill if self.name == "essm" else None,
        }


def label(row: dict) -> str:
    if row["model"] != "essm":
        return {"llama": "Llama (SDPA, KV cache)", "mamba": "Mamba (PyTorch path)"}[row["model"]]
    return f"ES-SSM k={row['spectral_budget']}" + ("" if row["future_fill"] else " naive cache")


def markdown(rows: list[dict], params: dict, settings: dict) -> str:
    contexts = sorted({row["context"] for row in rows})
    first, last = contexts[0], contexts[-1]
    header = ["model", "params"] + [f"ms/token @ {c}" for c in contexts] + [
        f"{last} / {first}", f"slowest step @ {last} (ms)", f"prefill @ {last} (s)", f"peak MiB @ {last}",
        f"cache MiB @ {last}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(label(row) for row in rows):
        runs = {row["context"]: row for row in rows if label(row) == name}
        end = runs[last]
        cells = [name, f"{params[end['model']] / 1e6:.1f}M"]
        cells += [f"{runs[c]['cpu_per_token_ms']:.1f} ({runs[c]['per_token_ms']:.1f})" for c in contexts]
        cells += [f"{end['cpu_per_token_ms'] / runs[first]['cpu_per_token_ms']:.2f}x", f"{end['slowest_step_ms']:.0f}",
                  f"{end['prefill_s']:.1f}", f"{end['peak_mb']:.0f}", f"{end['cache_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ms/token: process CPU time per decoded token, single-threaded, with the wall-clock time in brackets (the "
        "machine is shared, so wall time carries other jobs' load); the ratio uses CPU time. Medians over "
        f"{settings['repeats']} windows of {settings['steps']} decode steps for every model, interleaved across "
        f"models after a warm-up (naive cache: one window of {settings['naive_steps']}). Batch 1, float32, "
        f"{settings['threads']} thread(s), {settings['machine']}, torch {settings['torch']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 8, 4])
    parser.add_argument("--steps", type=int, default=256, help="decode steps per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-steps", type=int, default=32, help="decode steps of the naive-cache reference")
    parser.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared machine")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_generate"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    models = build_models(max_length=max(args.contexts) + args.steps)
    params = {name: num_parameters(model) for name, model in models.items()}
    rows = []
    for context in args.contexts:
        budgets = [("essm", {"spectral_budget": k}) for k in args.budgets]
        runs = [Run(name, models[name], context, args.steps, kwargs) for name, kwargs in
                [("llama", {}), ("mamba", {}), *budgets]]
        naive = Run("essm", models["essm"], context, args.naive_steps, {"spectral_budget": max(args.budgets)},
                    future_fill=False)
        for run in [*runs, naive]:
            run.start()
        for _ in range(args.repeats - 1):  # interleaved, so that a busy spell on the machine hits every model
            for run in runs:
                run.window()
        for run in [*runs, naive]:
            rows.append(run.result())
            print(json.dumps(rows[-1]), flush=True)

    settings = {
        "steps": args.steps, "naive_steps": args.naive_steps, "repeats": args.repeats,
        "threads": args.threads, "machine": cpu_name(),
        "torch": torch.__version__, "command": "python " + shlex.join(["scripts/bench_generate.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"settings": settings, "params": params, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = markdown(rows, params, settings)
    args.out.with_suffix(".md").write_text(f"Command: `{settings['command']}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
