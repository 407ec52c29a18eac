"""Train an ES-SSM with budget dropout from a YAML run config: `python scripts/train.py configs/listops.yaml`.

Same as the `essm-train` console command; also runs under `torchrun` and `accelerate launch`.
"""

from modeling_essm.cli import train_main


if __name__ == "__main__":
    train_main()
