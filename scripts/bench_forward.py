"""Forward and training-step speed of the reference ES-SSM LM against Llama (SDPA) and Mamba, in one run.

    python scripts/bench_forward.py                     # full run: lengths 1024, 4096, 16384
    python scripts/bench_forward.py --bf16              # the same under bf16 autocast, every system alike
    python scripts/bench_forward.py --lengths 512 --budgets 32,4 --repeats 1 --no-write   # smoke run

Every number is the median of `--repeats` timed runs after one warm-up, batch 1, float32 (or, with
`--bf16`, every system under `torch.autocast("cpu", dtype=torch.bfloat16)`, weights float32); the systems
of a table are timed round-robin, so a slow spell on a shared machine slows them all alike. Ratios are
against ES-SSM at full budget measured in this same run. Peak memory is the growth of the resident set
during one forward (VmHWM after minus VmRSS before, with the high-water mark reset), measured in a fresh
process per system and length so that the benchmark's own heap history cannot hide or inflate it.
Timings run with glibc keeping freed memory for reuse (`modeling_essm.cpu_allocator`) for every system
alike; memory is measured without it, so that the resident set follows the live tensors.
The ES-SSM mixer's achieved FLOP rate is reported as a fraction of this machine's measured fp32 GEMM rate
(the yardstick of the speed targets) and, in a bf16 run, of its bf16 GEMM rate too; the four speed targets are checked on
the run's own numbers. Results go to docs/bench_forward.json (bench_forward_bf16.json) and the marked
section of docs/performance.md for that precision.
"""

import argparse
import ctypes
import gc
import json
import math
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from modeling_essm import ESSSMConfig, ESSSMForCausalLM
from modeling_essm.cpu_allocator import reuse_freed_memory
from modeling_essm.modeling_essm import fft_length

DOCS = Path(__file__).resolve().parents[1] / "docs"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
FLOAT32, BF16_AUTOCAST = "float32", "bf16 autocast (weights float32)"


# --- measuring ------------------------------------------------------------------------------------------


def interleaved_medians(runs: dict, repeats: int) -> dict:
    """Median seconds of each run, timed round-robin so that a slow spell on a shared machine hits all alike.

    glibc keeps freed memory for reuse meanwhile, for every system alike (see modeling_essm.cpu_allocator).
    """
    reuse_freed_memory(True)
    try:
        for run in runs.values():
            run()  # warm-up: allocator, FFT plans, lazy inits
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        reuse_freed_memory(False)
    return {name: statistics.median(samples) for name, samples in times.items()}


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn) -> float | None:
    """Resident-set growth while `fn` runs (Linux only; None elsewhere)."""
    try:
        gc.collect()
        libc = ctypes.CDLL("libc.so.6")
        # Blocks >= 1 MiB get their own mappings, returned on free: the resident set then follows live tensors
        # (glibc's adaptive threshold would otherwise keep freed blocks on the heap, hiding or inflating peaks).
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM
        before = _proc_status_mb("VmRSS")
        fn()
        return _proc_status_mb("VmHWM") - before
    except (OSError, RuntimeError):
        return None


# --- models at matched size -----------------------------------------------------------------------------


ESSM_REFERENCE = dict(hidden_size=256, num_hidden_layers=8, num_spectral_filters=32)  # the paper's reference LM


def essm(max_len: int) -> ESSSMForCausalLM:
    return ESSSMForCausalLM(ESSSMConfig(**ESSM_REFERENCE, max_position_embeddings=max_len)).eval()


def llama(max_len: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=259, hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=max_len,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def mamba(max_len: int, **settings) -> MambaForCausalLM:
    config = MambaConfig(vocab_size=259, hidden_size=384, num_hidden_layers=22, state_size=16, expand=2,
                         tie_word_embeddings=True, **settings)
    return MambaForCausalLM(config).eval()


BUILDERS = {"ES-SSM": essm, "Llama (SDPA)": llama, "Mamba": mamba}


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def mixer_flops(config: ESSSMConfig, seq_len: int, budget: int) -> float:
    """FLOPs of one spectral mixer: gate, skip, spectral GEMM, FFTs (2.5 n log2 n per real FFT), complex products."""
    d, g, n = config.hidden_size, config.gate_hidden_size, fft_length(seq_len)
    dense = 2 * seq_len * (d * g + g * budget + d * d + budget * d * d)
    ffts = (d + budget * d) * 2.5 * n * math.log2(n)
    products = 6 * (n // 2 + 1) * budget * d + 2 * seq_len * budget * d
    return dense + ffts + products


# --- the run --------------------------------------------------------------------------------------------


def forward_rows(args, lengths, budgets):
    rows = []
    for seq_len in lengths:
        x = torch.randint(0, 256, (1, seq_len))
        systems = [("ES-SSM", k) for k in budgets] + [("Llama (SDPA)", None), ("Mamba", None)]
        memory = {(name, budget): fresh_process_memory_mb(name, max(lengths), seq_len, budget, args.bf16)
                  for name, budget in systems}
        models = {name: build(max(lengths)) for name, build in BUILDERS.items()}
        runs = {(name, budget): partial(forward, models[name], x, budget, args.bf16) for name, budget in systems}
        seconds = interleaved_medians(runs, args.repeats)
        for name, budget in runs:
            row = dict(model=name, budget=budget, seq_len=seq_len, parameters=parameters(models[name]),
                       seconds=seconds[name, budget], tokens_per_s=seq_len / seconds[name, budget],
                       peak_memory_mb=memory[name, budget])
            rows.append(row)
            print(f"forward  {name:13} k={budget!s:>4} T={seq_len:>6}: {row['tokens_per_s']:>9.0f} tok/s, "
                  f"{row['peak_memory_mb'] or float('nan'):8.0f} MB", flush=True)
        del models, runs
        gc.collect()
    return rows


def bf16_autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def fresh_process_memory_mb(name: str, max_len: int, seq_len: int, budget, bf16: bool) -> float | None:
    """Peak memory of one forward of a newly built model, in a new interpreter (spawned, not forked)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(forward_memory_mb, name, max_len, seq_len, budget, bf16).result()


def forward_memory_mb(name: str, max_len: int, seq_len: int, budget, bf16: bool) -> float | None:
    torch.manual_seed(0)
    model, x = BUILDERS[name](max_len), torch.randint(0, 256, (1, seq_len))
    return peak_memory_mb(partial(forward, model, x, budget, bf16))


@torch.no_grad()
def forward(model, x, budget, bf16=False):
    with bf16_autocast(bf16):
        return model(x) if budget is None else model(x, spectral_budget=budget)


def training_step(model, x, budget, bf16=False):
    model.zero_grad(set_to_none=True)
    kwargs = {} if budget is None else {"spectral_budget": budget}
    with bf16_autocast(bf16):
        loss = model(x, labels=x, **kwargs).loss
    loss.backward()


def training_rows(args, budgets):
    seq_len = args.train_length
    x = torch.randint(0, 256, (1, seq_len))
    # Mamba is left out here: on CPU its pure-PyTorch scan needs minutes per training step at this length.
    models = {"ES-SSM": essm(seq_len).train(), "Llama (SDPA)": llama(seq_len).train()}
    systems = [("ES-SSM", k) for k in sorted({budgets[0], budgets[-1]}, reverse=True)] + [("Llama (SDPA)", None)]
    runs = {(name, budget): partial(training_step, models[name], x, budget, args.bf16) for name, budget in systems}
    seconds = interleaved_medians(runs, args.repeats)
    rows = []
    for name, budget in systems:
        rows.append(dict(model=name, budget=budget, seq_len=seq_len, parameters=parameters(models[name]),
                         seconds=seconds[name, budget], tokens_per_s=seq_len / seconds[name, budget]))
        print(f"train    {name:13} k={budget!s:>4} T={seq_len:>6}: {rows[-1]['tokens_per_s']:>9.0f} tok/s", flush=True)
    return rows


def mixer_row(args):
    """The first block's mixer at full budget, timed beside 2048^3 GEMMs: fp32 always, and bf16 in a bf16 run."""
    seq_len = args.mixer_length
    model = essm(seq_len)
    mixer, basis = model.model.layers[0].mixer, model.model.spectral_basis
    budget = model.config.num_spectral_filters
    u = torch.randn(1, seq_len, model.config.hidden_size)
    precisions = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if args.bf16 else {})}
    gemms = {name: [torch.randn(2048, 2048, dtype=dtype) for _ in range(2)] for name, dtype in precisions.items()}
    spectrum = basis.filter_spectrum(seq_len, budget)

    @torch.no_grad()
    def run_mixer():
        with bf16_autocast(args.bf16):
            mixer(u, spectrum, budget)

    # The GEMMs run outside autocast, which would turn the float32 one into bf16.
    runs = {"mixer": run_mixer, **{name: partial(torch.matmul, a, b) for name, (a, b) in gemms.items()}}
    seconds = interleaved_medians(runs, args.repeats)
    rate = mixer_flops(model.config, seq_len, budget) / seconds["mixer"] / 1e9
    gemm_rates = {name: 2 * 2048**3 / seconds[name] / 1e9 for name in precisions}
    print(f"mixer    k={budget} T={seq_len}: {rate:.1f} GFLOP/s = " + ", ".join(
        f"{rate / gemm:.0%} of the {name} GEMM rate ({gemm:.1f})" for name, gemm in gemm_rates.items()), flush=True)
    return dict(seq_len=seq_len, budget=budget, seconds=seconds["mixer"], gflops=rate, gemm_gflops=gemm_rates,
                fraction_of_gemm={name: rate / gemm for name, gemm in gemm_rates.items()})


def with_ratios(rows):
    """Adds each row's tokens/s as a ratio to ES-SSM at full budget at the same length."""
    full = {r["seq_len"]: r["tokens_per_s"] for r in rows if r["model"] == "ES-SSM" and r["budget"] == 32}
    return [dict(r, speed_vs_full=r["tokens_per_s"] / full[r["seq_len"]] if r["seq_len"] in full else None)
            for r in rows]


TARGET_VERDICT = {True: "met", False: "MISSED", None: "not measured"}


def issue_targets(result) -> list[dict]:
    """The four speed targets, each checked on this run's own numbers (met is None where it was not measured)."""
    forward = {(r["model"], r["budget"], r["seq_len"]): r["tokens_per_s"] for r in result["forward"]}

    def at_least(text, value, threshold, shown_as):
        measured = "-" if value is None else shown_as.format(value)
        return dict(target=text, measured=measured, met=None if value is None else value >= threshold)

    def speed_ratio(fast, slow):
        return forward[fast] / forward[slow] if fast in forward and slow in forward else None

    mixer = result["mixer"]
    fraction = mixer["fraction_of_gemm"]["fp32"] if (mixer["budget"], mixer["seq_len"]) == (32, 4096) else None
    peaks = {r["budget"]: r["peak_memory_mb"] for r in result["forward"]
             if r["model"] == "ES-SSM" and r["seq_len"] == 16384 and r["peak_memory_mb"] is not None}
    memory = dict(target="L=16384: inference peak memory grows with the budget by no more than the extra weights",
                  measured="-", met=None)
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        growth = max(peaks.values()) - peaks[low]
        # The M_j that the largest budget reads beyond the smallest one's, float32.
        extra = (high - low) * ESSM_REFERENCE["hidden_size"] ** 2 * 4 * ESSM_REFERENCE["num_hidden_layers"] / 2**20
        memory.update(measured=f"+{growth:.0f} MB from k={low} to k={high}; extra weights {extra:.0f} MB",
                      met=growth <= extra)
    return [
        at_least("L=16384: ES-SSM k=32 >= 3x the tokens/s of Llama",
                 speed_ratio(("ES-SSM", 32, 16384), ("Llama (SDPA)", None, 16384)), 3.0, "{:.2f}x"),
        at_least("L=4096: k=4 >= 2.8x the tokens/s of k=32",
                 speed_ratio(("ES-SSM", 4, 4096), ("ES-SSM", 32, 4096)), 2.8, "{:.2f}x"),
        at_least("mixer at k=32, L=4096 >= 50% of the fp32 GEMM rate", fraction, 0.5, "{:.0%}"),
        memory,
    ]


def markdown(result) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads, "
             f"{result['precision']}, batch 1. "
             f"Medians of {result['repeats']} runs after a warm-up, timed round-robin across systems"
             f"{', glibc keeping freed memory for reuse' if result.get('reuses_freed_memory') else ''}.", "",
             "Measured GEMM rate (2048^3): " + ", ".join(
                 f"{name} **{gemm:.1f} GFLOP/s**" for name, gemm in result["mixer"]["gemm_gflops"].items()) + ". "
             f"ES-SSM mixer at k={result['mixer']['budget']}, L={result['mixer']['seq_len']}: "
             f"{result['mixer']['gflops']:.1f} GFLOP/s = " + ", ".join(
                 f"**{fraction:.0%}** of the {name} rate" for name, fraction in result["mixer"]["fraction_of_gemm"].items())
             + ".", "",
             "The speed targets, checked on this run's numbers:", "", "| target | this run | |", "|---|---|---|",
             *(f"| {t['target']} | {t['measured']} | {TARGET_VERDICT[t['met']]} |" for t in issue_targets(result)), "",
             "Forward (inference):", "",
             "| model | budget | length | parameters | tokens/s | vs ES-SSM k=32 | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["forward"]:
        lines.append(f"| {r['model']} | {r['budget'] or '-'} | {r['seq_len']} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['tokens_per_s']:.0f} | {fmt(r['speed_vs_full'], '.2f')}x | {fmt(r['peak_memory_mb'], '.0f')} |")
    lines += ["", f"Training step (forward + backward), length {result['training'][0]['seq_len']}:", "",
              "| model | budget | parameters | tokens/s | vs ES-SSM k=32 |", "|---|---|---|---|---|"]
    for r in result["training"]:
        lines.append(f"| {r['model']} | {r['budget'] or '-'} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['tokens_per_s']:.0f} | {fmt(r['speed_vs_full'], '.2f')}x |")
    return "\n".join(lines)


def output_names(precision: str) -> tuple[str, str, str]:
    """The JSON's stem and the markers of the section in docs/performance.md that a run of this precision owns."""
    name = "bench_forward" if precision == FLOAT32 else "bench_forward_bf16"
    return name, f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def performance_page(precision: str) -> str:
    """docs/performance.md's text; a page without this precision's markers is refused (checked before measuring)."""
    _, begin, end = output_names(precision)
    page = DOCS / "performance.md"
    text = page.read_text() if page.exists() else f"# Performance\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{page} lacks the markers {begin} / {end}: not overwriting hand-written text.")
    return text


def write(result):
    """The JSON and the marked section of docs/performance.md for the run's precision; other text stays."""
    name, begin, end = output_names(result["precision"])
    head, rest = performance_page(result["precision"]).split(begin, 1)
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / "performance.md").write_text(f"{head}{begin}\n{markdown(result)}\n{end}{rest.split(end, 1)[1]}")
    print(f"wrote {DOCS / f'{name}.json'} and {DOCS / 'performance.md'}")


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"--{name} values must be positive, got {text!r}")
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--budgets", default="32,16,8,4,2")
    parser.add_argument("--train-length", type=int, default=4096)
    parser.add_argument("--mixer-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="run every system under bf16 autocast")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    lengths, budgets = parse_ints(args.lengths, "lengths"), sorted(parse_ints(args.budgets, "budgets"), reverse=True)
    if budgets[0] != 32 or budgets[-1] < 2:
        raise SystemExit("--budgets must include 32 (the full budget, the reference of every ratio) and stay >= 2")
    precision_label = BF16_AUTOCAST if args.bf16 else FLOAT32
    if not args.no_write:
        performance_page(precision_label)  # a page it may not write is refused before the minutes of measuring
    torch.manual_seed(0)
    reuses_freed_memory = reuse_freed_memory(False)  # glibc present: the timings will reuse freed memory
    options = {f"--{name.replace('_', '-')}": value for name, value in vars(args).items() if name != "no_write"}
    result = dict(command="python scripts/bench_forward.py " + " ".join(
                      name if value is True else f"{name} {value}" for name, value in options.items() if value is not False),
                  machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats,
                  precision=precision_label,
                  reuses_freed_memory=reuses_freed_memory,
                  mixer=mixer_row(args),
                  forward=with_ratios(forward_rows(args, lengths, budgets)),
                  training=with_ratios(training_rows(args, budgets)))
    print(markdown(result))
    if not args.no_write:
        write(result)


if __name__ == "__main__":
    main()
