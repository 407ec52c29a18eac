"""Push a saved ES-SSM to the Hub with its budget model card (the `essm-push-to-hub` command).

    python scripts/push_to_hub.py MODEL_FOLDER OWNER/NAME [--budgets 4,8] [--sweep budget_sweep.json]
"""

from modeling_essm.hub import main

if __name__ == "__main__":
    main()
