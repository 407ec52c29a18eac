"""Benchmark tasks as `datasets.Dataset` splits: `load_task(name, ...) -> TaskData`.

One module per task; each exposes `load(data_dir, max_length, train_size, eval_size, seed,
**options)`. Modules are imported on first use, so loading ListOps never imports Pillow.
"""

import importlib
import inspect

from ._common import BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID, BYTE_VOCAB_SIZE, TaskData, check_positive_int

BENCHMARK_TASKS = ("listops", "text", "image", "audio", "lm")  # the data sets the comparisons run on
TASK_NAMES = (*BENCHMARK_TASKS, "files")  # and your own files

__all__ = ["BENCHMARK_TASKS", "TASK_NAMES", "TaskData", "load_task", "task_fields", "BYTE_PAD_ID", "BYTE_BOS_ID", "BYTE_EOS_ID", "BYTE_VOCAB_SIZE"]


def load_task(name, data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0, **options) -> TaskData:
    """Train and eval splits of one task.

    data_dir: folder with the shared data files (default: $ESSM_DATA_DIR, else ../shared/data from the
        working directory); unused by ListOps and the files task (whose paths may be relative to it).
    max_length: longest sequence (task default when None; see each module).
    train_size, eval_size: rows per split, a seeded class-balanced subset (None: the whole
        split, or for ListOps the default number of generated trees).
    options: task-specific, e.g. `min_length` for ListOps.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    check_positive_int("train_size", train_size)
    check_positive_int("eval_size", eval_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    module = importlib.import_module(f".{name}", __name__)
    return module.load(data_dir, max_length, train_size, eval_size, seed, **options)


def task_fields(name) -> set[str]:
    """The settings `load_task` accepts for task `name`, `name` included: what a run config's task section may hold."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    module = importlib.import_module(f".{name}", __name__)
    return {"name", *inspect.signature(module.load).parameters}
