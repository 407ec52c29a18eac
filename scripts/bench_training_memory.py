"""Training memory and step time of ES-SSM against the spectral budget, in a plain process.

For each budget: the peak of the memory torch's tensors hold during one forward + backward (the profiler's
allocations summed in order, as `essm-plan` measures; the recomputed path's reused chunk buffers are released first,
so that the peak counts them), and the median time of a training step with AdamW.

    python scripts/bench_training_memory.py [--recompute] --hidden-size 64 --layers 2 --length 784 --batch-size 16
"""

import argparse
import json
import statistics
import time

import torch

from modeling_essm import ESSSMConfig, ESSSMForSequenceClassification
from modeling_essm.planner import peak_memory_mb
from modeling_essm.spectral_channels import release_workspace


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute", action="store_true", help="spectral_recompute=True: chunks recomputed in backward")
    parser.add_argument("--chunk-size", type=int, default=8, help="spectral_chunk_size: channels recomputed at once")
    parser.add_argument("--saved-mb", type=float, default=ESSSMConfig().spectral_saved_mb,
                        help="spectral_saved_mb: MB per layer and block of sequences of convolutions saved for "
                             "backward when recomputing (default: the config's, %(default)s)")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ESSSMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_spectral_filters=args.filters,
                         max_position_embeddings=args.length, num_labels=10, intermediate_size=2 * args.hidden_size,
                         spectral_recompute=args.recompute, spectral_chunk_size=args.chunk_size,
                         spectral_saved_mb=args.saved_mb)
    model = ESSSMForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (args.batch_size, args.length))
    y = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for k in args.budgets:
        def forward_backward():
            model(x, labels=y, spectral_budget=k).loss.backward()

        def step():
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        release_workspace()
        peak = peak_memory_mb(forward_backward, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        rows.append({"budget": k, "peak_memory_mb": peak, "seconds_per_step": statistics.median(times)})
        print(f"k={k:>2}: peak {peak:7.1f} MB, step {statistics.median(times):.2f} s", flush=True)
    if args.output:
        with open(args.output, "w") as file:
            json.dump({"settings": vars(args) | {"threads": torch.get_num_threads()}, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
