"""With its default settings and a plain `Trainer`, an ES-SSM learns a dependency over 100 positions.

The task: a key token (4 classes), 100 noise tokens from another vocabulary, a query token; the label is the
key and the classifier reads the last position only, so the answer must travel 101 positions. Before
`spectral_proj_multiplier` (at 1) the same run stays at chance: the far-reaching channels, damped by
sigma^(1/4) and averaged by the gate, barely move in a few hundred Adam steps (docs/training.md).
"""

import random

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from modeling_essm import BudgetSamplingCallback, ESSSMConfig, ESSSMForSequenceClassification
from modeling_essm.training import PaddingCollator

NUM_KEYS, NUM_NOISE, GAP = 4, 8, 100
QUERY = NUM_KEYS + NUM_NOISE


def recall_dataset(size, seed):
    rng = random.Random(seed)
    keys = [rng.randrange(NUM_KEYS) for _ in range(size)]
    input_ids = [[key] + [NUM_KEYS + rng.randrange(NUM_NOISE) for _ in range(GAP)] + [QUERY] for key in keys]
    return Dataset.from_dict({"input_ids": input_ids, "labels": keys})


def test_a_plain_trainer_learns_a_token_101_positions_back(tmp_path):
    torch.manual_seed(0)
    config = ESSSMConfig(vocab_size=QUERY + 1, hidden_size=32, num_hidden_layers=1, num_spectral_filters=32,
                         max_position_embeddings=128, intermediate_size=64, num_labels=NUM_KEYS,
                         classifier_pooling="last", pad_token_id=None, bos_token_id=None, eos_token_id=None)
    model = ESSSMForSequenceClassification(config)  # every other setting at its default
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=400, per_device_train_batch_size=16,
                             learning_rate=3e-3, warmup_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=recall_dataset(4000, seed=0),
            data_collator=PaddingCollator(pad_token_id=None), callbacks=[BudgetSamplingCallback()]).train()
    test = recall_dataset(200, seed=1)
    model.eval()
    with torch.no_grad():
        predictions = model(torch.tensor(test["input_ids"])).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(test["labels"])).float().mean().item()
    assert accuracy >= 0.6, f"accuracy {accuracy:.2f} at full budget; the label prior is 0.25"
