"""IMDb sentiment as bytes (LRA "Text"): each review's UTF-8 bytes, truncated to max_length
(default and LRA: 4096), label 0 negative / 1 positive. Tokens are byte values 0..255 with
no BOS/EOS added; the vocabulary also holds the byte-level specials (pad 256, bos 257,
eos 258) so text and LM models share one embedding table."""

import gzip
import json

import numpy as np

from ..tokenization_essm import build_fast_tokenizer
from ._common import BYTE_PAD_ID, BYTE_VOCAB_SIZE, TaskData, check_max_length, choose_rows, data_file, labelled_dataset

FILENAME = "imdb.jsonl.gz"
DEFAULT_MAX_LENGTH = 4096
LABEL_NAMES = ("neg", "pos")


def read_reviews(path, max_length: int) -> dict:
    """{"train": (byte arrays, labels), "test": (...)} from the jsonl.gz file."""
    splits = {"train": ([], []), "test": ([], [])}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            review = json.loads(line)
            sequences, labels = splits[review["split"]]
            sequences.append(np.frombuffer(review["text"].encode("utf-8")[:max_length], dtype=np.uint8))
            labels.append(review["label"])
    return splits


def load(data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0) -> TaskData:
    """IMDb train and test splits (25,000 each); sizes take a seeded balanced subset."""
    max_length = check_max_length("text", max_length, 1, DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    splits = read_reviews(data_file(data_dir, FILENAME), max_length)
    datasets = {}
    for split, size in (("train", train_size), ("test", eval_size)):
        sequences, labels = splits[split]
        rows = choose_rows(len(labels), size, seed, labels)
        datasets[split] = labelled_dataset([sequences[i] for i in rows], np.asarray(labels)[rows], LABEL_NAMES)
    return TaskData(
        name="text",
        train=datasets["train"],
        eval=datasets["test"],
        num_labels=2,
        vocab_size=BYTE_VOCAB_SIZE,
        input_size=None,
        pad_token_id=BYTE_PAD_ID,
        max_length=max_length,
        metric="accuracy",
        label_names=LABEL_NAMES,
        build_tokenizer=build_fast_tokenizer,
    )
