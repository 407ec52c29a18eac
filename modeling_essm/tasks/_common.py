"""Helpers shared by the task modules: where the data lives, argument checks, and
building `datasets.Dataset` splits quickly from numpy arrays."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

# Byte-level vocabulary shared by the text and LM tasks: a token is a byte value 0..255,
# followed by three specials. The stored sequences hold plain bytes only (no BOS/EOS), so a
# model trained on one byte task can be evaluated or fine-tuned on the other.
BYTE_PAD_ID = 256
BYTE_BOS_ID = 257
BYTE_EOS_ID = 258
BYTE_VOCAB_SIZE = 259

DATA_DIR_ENV = "ESSM_DATA_DIR"
CACHE_DIR_ENV = "ESSM_CACHE_DIR"
_HOW_TO_POINT = f"pass data_dir=... to load_task or set {DATA_DIR_ENV} to the shared data folder"


@dataclass(frozen=True)
class TaskData:
    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int | None  # None for language modelling
    vocab_size: int | None  # None for real-valued inputs
    input_size: int | None  # features per step for real-valued inputs, else None
    pad_token_id: int | None
    max_length: int
    metric: str  # "accuracy" or "bits_per_byte"
    label_names: tuple[str, ...] | None = None  # the classes' names, by id, when the data names them
    # Builds the tokenizer that writes this task's inputs as text, when they have a text form; training saves it
    # beside the model, so the folder reads text as it is.
    build_tokenizer: Callable | None = None


def resolve_data_dir(data_dir=None) -> Path:
    """The explicit argument, else $ESSM_DATA_DIR, else ../shared/data relative to the working directory (the
    benchmark data beside a checkout of this repository, when a command runs from its root)."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    folder = Path(data_dir).expanduser() if data_dir is not None else Path("..") / "shared" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found at {folder.resolve()}; {_HOW_TO_POINT}")
    return folder


def data_file(data_dir, filename: str) -> Path:
    path = resolve_data_dir(data_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}; {_HOW_TO_POINT}")
    return path


def cache_dir() -> Path:
    """Decoded-data cache, outside the repository so derived data is never committed."""
    path = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "modeling_essm" / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_positive_int(name: str, value, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def check_max_length(task: str, max_length, low: int, high: int, default: int) -> int:
    if max_length is None:
        return default
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not low <= max_length <= high:
        raise ValueError(f"max_length for {task!r} must be an integer in [{low}, {high}], got {max_length!r}")
    return int(max_length)


def list_column(sequences, dtype: str) -> pa.ListArray:
    """An Arrow list column built from one flat array: converting millions of Python
    numbers one by one takes seconds per split. Sequences of frames (2-D arrays, every frame
    the same size) become lists of fixed-size lists."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    frame_shape = np.shape(sequences[0])[1:] if len(sequences) else ()
    flat = np.concatenate([np.asarray(s, dtype=dtype) for s in sequences]) if len(sequences) else np.zeros(0, dtype)
    values = pa.array(flat.reshape(-1))
    if frame_shape:
        values = pa.FixedSizeListArray.from_arrays(values, frame_shape[0])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def labelled_dataset(sequences, labels, label_names, column="input_ids", dtype="int16") -> datasets.Dataset:
    """A classification split: one list column (token ids by default; frames when the sequences
    are 2-D arrays) and `labels` (ClassLabel)."""
    step = datasets.Value(dtype)
    if len(sequences) and np.ndim(sequences[0]) == 2:
        step = datasets.List(step, length=np.shape(sequences[0])[1])
    features = datasets.Features({column: datasets.List(step), "labels": datasets.ClassLabel(names=list(label_names))})
    columns = {column: list_column(sequences, dtype), "labels": np.asarray(labels, dtype=np.int64)}
    return datasets.Dataset.from_dict(columns, features=features)


def choose_rows(num_rows: int, size: int | None, seed: int, labels=None) -> np.ndarray:
    """Indices of `size` rows chosen with `seed`, in their original order (all rows when size
    is None). With labels the classes are as equal as the data allows: classes are visited in
    turn, each giving its next random row, so a class that runs out leaves the rest to others."""
    if size is None:
        return np.arange(num_rows)
    if size > num_rows:
        raise ValueError(f"asked for {size} rows but the split has only {num_rows}")
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(num_rows, size=size, replace=False))
    labels = np.asarray(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # Rank every row within its class; sorting by (rank, class) interleaves the classes.
    ranks = np.concatenate([np.arange(len(rows)) for rows in per_class])
    classes = np.concatenate([np.full(len(rows), c) for c, rows in enumerate(per_class)])
    chosen = np.concatenate(per_class)[np.lexsort((classes, ranks))[:size]]
    return np.sort(chosen)
