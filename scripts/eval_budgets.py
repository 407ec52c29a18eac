"""Evaluate a trained ES-SSM at every spectral budget: `python scripts/eval_budgets.py outputs/listops`.

Same as the `essm-eval-budgets` console command.
"""

from modeling_essm.cli import eval_budgets_main


if __name__ == "__main__":
    eval_budgets_main()
