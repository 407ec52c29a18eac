"""Train and compare ES-SSM, ES-SSM at full K only, Llama and Mamba on one task:
`python scripts/compare.py configs/bench/listops.yaml --models essm,essm-fixed,llama,mamba`.

Same as the `essm-compare` console command; `python scripts/build_results.py` then builds docs/results.md.
"""

from modeling_essm.compare import main


if __name__ == "__main__":
    main()
