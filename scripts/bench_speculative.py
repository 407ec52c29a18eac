"""Self-speculative decoding of a trained ES-SSM language model: greedy decoding at the full budget K with drafts
at smaller budgets (`generate(..., draft_budget=d)`), against plain greedy decoding at K, all in one run.

For each context length the prompt is the first `context` bytes of the Tiny Shakespeare validation text (the LM
task's held-out split). Every method generates `new_tokens` bytes greedily (eos ignored) and must produce exactly
the tokens of plain decoding. Reported per method: the acceptance rate (drafts the full budget kept / drafts made),
tokens per verifying forward, decode tokens/s and the speed-up over plain decoding. Decode time is the time of the
whole generate call minus that of a plain one that generates a single token (the prompt's prefill), so the draft's
own prefill counts against speculative decoding. Medians over repeats interleaved across methods; process CPU time
on one thread (wall-clock in the JSON).

    OMP_NUM_THREADS=1 python scripts/bench_speculative.py outputs/spec/lm_d256  # docs/bench_speculative.{json,md}
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_generate import cpu_name
from transformers import AutoModelForCausalLM

import modeling_essm  # noqa: F401  (registers the Auto classes)
from modeling_essm.tasks import load_task


def prompt_of(context: int) -> torch.Tensor:
    """The first `context` bytes of the held-out text: (1, context)."""
    chunk = load_task("lm", max_length=context).eval[0]["input_ids"]
    return torch.tensor(chunk, dtype=torch.long).unsqueeze(0)


@torch.no_grad()
def agreement(model, sequence: torch.Tensor, context: int, draft_budget: int, full_budget: int) -> float:
    """How often the draft budget's greedy choice is the full budget's over the generated positions, given the same
    text (teacher forcing): the per-token acceptance that speculative decoding can expect."""
    full, draft = (model(sequence, spectral_budget=budget).logits[0, context - 1 : -1].argmax(-1)
                   for budget in (full_budget, draft_budget))
    return (full == draft).float().mean().item()


class Method:
    """One way of decoding: its generate kwargs, and per repeat its time and forward-call counts."""

    def __init__(self, name: str, kwargs: dict):
        self.name, self.kwargs = name, kwargs
        self.cpu, self.wall, self.verifications, self.drafts = [], [], [], []

    def run(self, model, prompt, new_tokens: int, full_budget: int) -> torch.Tensor:
        budgets = []
        handle = model.register_forward_pre_hook(
            lambda _, args, kwargs: budgets.append(kwargs.get("spectral_budget")), with_kwargs=True)
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            out = model.generate(prompt, do_sample=False, eos_token_id=None, max_new_tokens=new_tokens,
                                 spectral_budget=full_budget, **self.kwargs)
            self.cpu.append(time.process_time() - cpu)
            self.wall.append(time.perf_counter() - wall)
        finally:
            handle.remove()
        self.verifications.append(budgets.count(full_budget))
        self.drafts.append(len(budgets) - budgets.count(full_budget))
        return out


def summary(method: Method, prefill: Method, plain: Method, new_tokens: int) -> dict:
    def decode_rate(times, prefill_times):
        return (new_tokens - 1) / (statistics.median(times) - statistics.median(prefill_times))

    rounds, drafts = method.verifications[0], method.drafts[0]  # greedy: the same every repeat
    return {
        "method": method.name, **method.kwargs, "new_tokens": new_tokens, "repeats": len(method.cpu),
        "verifying_forwards": rounds, "draft_forwards": drafts,
        "acceptance_rate": (new_tokens - rounds) / drafts if drafts else None,
        "tokens_per_verification": new_tokens / rounds,
        "tokens_per_s": decode_rate(method.cpu, prefill.cpu),
        "wall_tokens_per_s": decode_rate(method.wall, prefill.wall),
        "speedup": decode_rate(method.cpu, prefill.cpu) / decode_rate(plain.cpu, prefill.cpu),
        "median_generate_s": statistics.median(method.cpu),
    }


def markdown(rows: list[dict], settings: dict) -> str:
    header = ("| context | decoding | drafts / round | agreement | acceptance | tokens / verification | tokens/s "
              "| speed-up |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        drafts = {"constant": str(row.get("num_assistant_tokens")), "heuristic": f"{row.get('num_assistant_tokens')}, "
                  "adaptive"}.get(row.get("num_assistant_tokens_schedule"), "")
        agreement, acceptance = (f"{row[key]:.0%}" if row[key] is not None else "" for key in ("agreement",
                                                                                                "acceptance_rate"))
        lines.append(f"| {row['context']} | {row['method']} | {drafts} | {agreement} | {acceptance} | "
                     f"{row['tokens_per_verification']:.2f} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x |")
    footer = (f"Greedy decoding of {settings['new_tokens']} bytes at K = {settings['full_budget']}, identical tokens "
              "for every method; agreement: the draft budget's greedy choice is the full budget's, on plain "
              "decoding's text; tokens/s: decoded tokens per second of process CPU time, prefill excluded; medians of "
              f"{settings['repeats']} interleaved repeats; {settings['threads']} thread(s), {settings['machine']}, "
              f"torch {settings['torch']}; model {settings['model']}.")
    return "\n".join([*lines, "", footer]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a trained ES-SSM causal LM folder (essm-train's output_dir)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--draft-budgets", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4],
                        help="drafts per round (num_assistant_tokens); each also with the adaptive schedule")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared machine")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_speculative"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    full_budget = model.config.num_spectral_filters
    longest = max(args.contexts) + args.new_tokens
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"context {max(args.contexts)} + {args.new_tokens} new tokens exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    rows = []
    for context in args.contexts:
        prompt = prompt_of(context)
        prefill, plain = Method("prefill", {}), Method("plain", {})
        drafted = [Method(f"draft k={budget}", {"draft_budget": budget, "num_assistant_tokens": tokens,
                                                "num_assistant_tokens_schedule": schedule})
                   for budget in args.draft_budgets for tokens in args.draft_tokens
                   for schedule in ("constant", "heuristic")]
        prefill.run(model, prompt, 1, full_budget)  # warm-up
        for _ in range(args.repeats):  # interleaved, so that a busy spell on the machine hits every method
            prefill.run(model, prompt, 1, full_budget)
            expected = plain.run(model, prompt, args.new_tokens, full_budget)
            for method in drafted:
                if not torch.equal(method.run(model, prompt, args.new_tokens, full_budget), expected):
                    raise RuntimeError(f"{method.name} {method.kwargs} at context {context} changed the output")
        agreements = {budget: agreement(model, expected, context, budget, full_budget) for budget in args.draft_budgets}
        for method in [plain, *drafted]:
            budget = method.kwargs.get("draft_budget")
            rows.append({"context": context, **summary(method, prefill, plain, args.new_tokens),
                         "agreement": agreements.get(budget)})
            print(json.dumps(rows[-1]), flush=True)

    settings = {
        "model": str(args.model), "full_budget": full_budget, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "threads": args.threads, "machine": cpu_name(), "torch": torch.__version__,
        "command": "python " + shlex.join(["scripts/bench_speculative.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    table = markdown(rows, settings)
    command = f"OMP_NUM_THREADS={args.threads} {settings['command']}"
    args.out.with_suffix(".md").write_text(f"Command: `{command}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
