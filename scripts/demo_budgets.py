"""Builds an untrained reference-size ES-SSM LM and runs it at several spectral budgets.

For each budget: parameters of the compact `slice_to_budget` model, median forward time, and the
largest logit difference from the full budget. Shows the knob works before any training.
"""

import argparse
import statistics
import time

import torch

from modeling_essm import ESSSMConfig, ESSSMForCausalLM


def median_seconds(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--budgets", default="32,16,8,4,2")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ESSSMConfig(hidden_size=256, num_hidden_layers=8, num_spectral_filters=32,
                         max_position_embeddings=max(args.seq_len, 4096))
    model = ESSSMForCausalLM(config).eval()
    x = torch.randint(0, 256, (1, args.seq_len))
    with torch.no_grad():
        full = model(x).logits
        print(f"ES-SSM LM, D=256, 8 layers, K=32, sequence length {args.seq_len}, untrained")
        print(f"{'budget':>6} {'parameters':>11} {'forward s':>10} {'max |logit - full|':>19}")
        for k in (int(b) for b in args.budgets.split(",")):
            params = sum(p.numel() for p in model.slice_to_budget(k).parameters())
            seconds = median_seconds(lambda: model(x, spectral_budget=k))
            diff = (model(x, spectral_budget=k).logits - full).abs().max().item()
            print(f"{k:>6} {params:>11,} {seconds:>10.3f} {diff:>19.4f}")


if __name__ == "__main__":
    main()
