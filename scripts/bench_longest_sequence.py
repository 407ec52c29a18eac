"""The longest sequence one training step fits in, for the reference ES-SSM LM (D=256, 8 layers, K=32, batch 1)
with its convolutions kept or recomputed (`spectral_recompute`, the default), and for the parameter-matched Llama
(SDPA) of scripts/bench_forward.py.

    python scripts/bench_longest_sequence.py --memory-gb 16 --output docs/longest_sequence.json

Lengths double from --start, then --refine bisection steps (to multiples of 1024) narrow the gap between the
longest that fits and the first that does not. Each length runs one forward + backward + AdamW step at the full
budget in a fresh process whose address space is capped at --memory-gb (so that running out is an allocation error,
not the kernel's OOM killer). Reported per length: fits or not, the process's peak resident memory, and the step's
seconds (one thread).
"""

import argparse
import json
import multiprocessing
import os
import re
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path


def one_step(path: str, seq_len: int, memory_bytes: int) -> dict:
    """Runs in a fresh process: one training step at `seq_len`, or the error that stopped it."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_forward import ESSM_REFERENCE, llama

    from modeling_essm import ESSSMConfig, ESSSMForCausalLM

    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        if path == "llama":
            model = llama(seq_len).train()
        else:
            config = ESSSMConfig(**ESSM_REFERENCE, max_position_embeddings=seq_len,
                                 spectral_recompute=path == "recomputed")
            model = ESSSMForCausalLM(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, 256, (1, seq_len))
        start = time.perf_counter()
        model(x, labels=x).loss.backward()
        optimizer.step()
        seconds, fits, error = time.perf_counter() - start, True, None
    except (RuntimeError, MemoryError) as failure:  # torch reports a failed allocation as a RuntimeError
        seconds, fits, error = None, False, str(failure).splitlines()[0][:200]
    peak_kb = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    return {"seq_len": seq_len, "fits": fits, "peak_rss_gb": peak_kb / 2**20, "seconds": seconds, "error": error}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=262144)
    parser.add_argument("--memory-gb", type=float, default=16.0, help="address-space cap of each step's process")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the doubling (default: 2)")
    parser.add_argument("--paths", nargs="+", choices=["kept", "recomputed", "llama"],
                        default=["kept", "recomputed", "llama"])
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="run the steps with glibc's mmap threshold fixed at its default 128 kB "
                        "(MALLOC_MMAP_THRESHOLD_=131072): large blocks always come from mmap and go back on free")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.return_freed_memory:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by glibc when each spawned step process starts
    context = multiprocessing.get_context("spawn")
    rows, longest = [], {}

    def fits(path: str, seq_len: int) -> bool:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                step = pool.submit(one_step, path, seq_len, int(args.memory_gb * 2**30)).result()
            except BrokenProcessPool:  # killed, e.g. by the kernel's OOM killer when the machine ran short first
                step = {"seq_len": seq_len, "fits": False, "peak_rss_gb": float("nan"), "seconds": None,
                        "error": "the process was killed"}
        row = {"path": path, **step}
        rows.append(row)
        outcome = f"{row['seconds']:.0f} s" if row["fits"] else f"does not fit: {row['error']}"
        print(f"{path:10} L={seq_len:>6}: peak RSS {row['peak_rss_gb']:5.1f} GB, {outcome}", flush=True)
        return row["fits"]

    for path in args.paths:
        low, high = 0, args.start
        while high <= args.max_length and fits(path, high):
            low, high = high, 2 * high
        for _ in range(args.refine if low and high <= args.max_length else 0):
            middle = (low + high) // 2 // 1024 * 1024
            if middle in (low, high):
                break
            low, high = (middle, high) if fits(path, middle) else (low, middle)
        longest[path] = low
        print(f"{path}: the longest that fits is {low} tokens", flush=True)
    if args.output:
        result = {"settings": vars(args), "longest": longest, "rows": rows}
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
