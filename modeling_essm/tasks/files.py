"""Your own data as a task: JSON, JSON Lines, CSV or Parquet files, or `datasets` folders (`save_to_disk`).

Each split is one file or folder (`train_file`, `eval_file`). A row holds text (`text_column`, read as its UTF-8
bytes: the byte vocabulary of the text and LM tasks, so `build_fast_tokenizer()` reads it) or token ids
(`input_ids`, with `vocab_size` given). For `objective="classification"` a row also holds a label
(`label_column`): integers from 0, or names, numbered in sorted order. For `objective="language_modeling"` each
row's bytes are cut into chunks of max_length (default 256); the tail shorter than a chunk is kept if at least 2.
"""

from pathlib import Path

import datasets
import numpy as np

from ..tokenization_essm import build_fast_tokenizer
from ._common import BYTE_PAD_ID, BYTE_VOCAB_SIZE, TaskData, check_max_length, check_positive_int, choose_rows

OBJECTIVES = ("classification", "language_modeling")
FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_MAX_LENGTH = 256
LONGEST = 65536


def read_table(path) -> datasets.Dataset:
    """The rows of a data file, or of a `datasets` folder (its test, else validation, else first split)."""
    path = Path(path)
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            split = next((name for name in ("test", "validation") if name in table), next(iter(table)))
            table = table[split]
        return table
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix not in FILE_KINDS:
        raise ValueError(f"{path}: pass a .json, .jsonl, .csv or .parquet file, or a datasets folder (save_to_disk)")
    return datasets.load_dataset(FILE_KINDS[path.suffix], data_files=str(path), split="train")


def token_rows(table, source, text_column: str, encode) -> list:
    """Each row's token ids: its `input_ids`, else `encode(text)`."""
    if "input_ids" in table.column_names:
        return [np.asarray(ids, dtype=np.int64) for ids in table["input_ids"]]
    if text_column not in table.column_names:
        raise ValueError(f"{source} has neither an input_ids nor a {text_column!r} column (columns: "
                         f"{table.column_names}); name the text column with text_column")
    return [np.asarray(list(encode(text)), dtype=np.int64) for text in table[text_column]]


def label_names(table, label_column: str) -> dict | None:
    """{name: id} in sorted order when the labels are names, else None (integer labels are ids)."""
    labels = table[label_column] if label_column in table.column_names else []
    if labels and all(isinstance(label, str) for label in labels):
        return {name: i for i, name in enumerate(sorted(set(labels)))}
    return None


def label_ids(table, source, label_column: str, names=None) -> np.ndarray:
    """The labels as ids: integers as they are, names through `names` ({name: id})."""
    if label_column not in table.column_names:
        raise ValueError(f"{source} has no {label_column!r} column for the labels (columns: {table.column_names}); "
                         "name it with label_column")
    labels = table[label_column]
    if names is not None:
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise ValueError(f"{source}: labels {unknown} are not among the known {sorted(names)}")
        return np.asarray([names[label] for label in labels])
    if not all(isinstance(label, int) and not isinstance(label, bool) and label >= 0 for label in labels):
        raise ValueError(f"{source}: column {label_column!r} must hold integers >= 0 or label names")
    return np.asarray(labels)


def byte_encode(text: str) -> bytes:
    return text.encode("utf-8")


def classification_split(table, source, text_column="text", label_column="label", max_length=None,
                         encode=byte_encode, names=None) -> datasets.Dataset:
    """`input_ids` (truncated to max_length) and `labels` of one classification split; `source` names it in errors."""
    rows = [ids[:max_length] for ids in token_rows(table, source, text_column, encode)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": label_ids(table, source, label_column, names)})


def language_modeling_split(table, source, text_column="text", max_length=DEFAULT_MAX_LENGTH, encode=byte_encode):
    """Chunks of max_length tokens of every row (a tail of 2 or more kept), as `input_ids` and `labels`."""
    chunks = [ids[start:start + max_length] for ids in token_rows(table, source, text_column, encode)
              for start in range(0, len(ids), max_length) if len(ids) - start >= 2]
    if not chunks:
        raise ValueError(f"{source} holds no row of 2 or more tokens to predict")
    return datasets.Dataset.from_dict({"input_ids": chunks, "labels": chunks})


def load(data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0, train_file=None, eval_file=None,
         objective="classification", text_column="text", label_column="label", vocab_size=None) -> TaskData:
    """Train and eval splits from your files; sizes take a seeded (for classification, class-balanced) subset.

    data_dir: a folder the file paths are relative to (default: as given). vocab_size: needed for data given as
    `input_ids`, whose padding then uses id 0 under the attention mask; text is read as bytes.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    for name, value in (("train_file", train_file), ("eval_file", eval_file)):
        if not isinstance(value, (str, Path)):
            raise ValueError(f"the files task needs {name}: a data file or datasets folder, got {value!r}")
    check_positive_int("vocab_size", vocab_size)
    max_length = check_max_length("files", max_length, 2, LONGEST, DEFAULT_MAX_LENGTH)
    paths = {split: Path(data_dir or ".") / value for split, value in (("train", train_file), ("eval", eval_file))}
    tables = {split: read_table(path) for split, path in paths.items()}
    by_ids = "input_ids" in tables["train"].column_names
    if by_ids and vocab_size is None:
        raise ValueError("data given as input_ids needs the task's vocab_size (the number of token ids)")
    classification = objective == "classification"
    names = label_names(tables["train"], label_column) if classification else None
    splits, num_labels = {}, None
    for split, size in (("train", train_size), ("eval", eval_size)):
        if classification:
            table = classification_split(tables[split], paths[split], text_column, label_column, max_length,
                                         names=names)
            labels = np.asarray(table["labels"])
            num_labels = max(num_labels or 0, int(labels.max()) + 1)  # every class in the files, kept or not
        else:
            table, labels = language_modeling_split(tables[split], paths[split], text_column, max_length), None
        splits[split] = table.select(choose_rows(len(table), size, seed, labels))
    return TaskData(
        name="files",
        train=splits["train"],
        eval=splits["eval"],
        num_labels=num_labels,
        vocab_size=vocab_size if by_ids else BYTE_VOCAB_SIZE,
        input_size=None,
        pad_token_id=None if by_ids else BYTE_PAD_ID,
        max_length=max_length,
        metric="accuracy" if classification else "bits_per_byte",
        label_names=tuple(names) if names else None,
        build_tokenizer=None if by_ids else build_fast_tokenizer,
    )
