"""Byte-level language modelling on Tiny Shakespeare: the first 90% of the file's bytes for
training, the last 10% for validation, each cut into non-overlapping chunks of max_length
bytes (default 256; the tail shorter than a chunk is dropped). `labels` is a copy of
`input_ids`: the causal LM shifts it, so each chunk scores max_length - 1 predictions.
Metric: bits per byte = mean cross-entropy in nats / ln 2."""

import datasets
import numpy as np

from ..tokenization_essm import build_fast_tokenizer
from ._common import BYTE_PAD_ID, BYTE_VOCAB_SIZE, TaskData, check_max_length, choose_rows, data_file, list_column

FILENAME = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9
DEFAULT_MAX_LENGTH = 256
LONGEST = 65536


def chunks(data: np.ndarray, length: int) -> np.ndarray:
    return data[: len(data) // length * length].reshape(-1, length)


def load(data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0) -> TaskData:
    """Train and validation chunks; sizes take a seeded random subset of chunks."""
    max_length = check_max_length("lm", max_length, 2, LONGEST, DEFAULT_MAX_LENGTH)
    data = np.frombuffer(data_file(data_dir, FILENAME).read_bytes(), dtype=np.uint8)
    boundary = int(len(data) * TRAIN_FRACTION)
    features = datasets.Features({name: datasets.List(datasets.Value("int16")) for name in ("input_ids", "labels")})
    splits = {}
    for split, text, size in (("train", data[:boundary], train_size), ("eval", data[boundary:], eval_size)):
        split_chunks = chunks(text, max_length)
        if len(split_chunks) == 0:
            raise ValueError(f"max_length={max_length} is longer than the {split} text ({len(text)} bytes)")
        column = list_column(split_chunks[choose_rows(len(split_chunks), size, seed)], "int16")
        splits[split] = datasets.Dataset.from_dict({"input_ids": column, "labels": column}, features=features)
    return TaskData(
        name="lm",
        train=splits["train"],
        eval=splits["eval"],
        num_labels=None,
        vocab_size=BYTE_VOCAB_SIZE,
        input_size=None,
        pad_token_id=BYTE_PAD_ID,
        max_length=max_length,
        build_tokenizer=build_fast_tokenizer,
        metric="bits_per_byte",
    )
