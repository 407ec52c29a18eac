"""The `files` task: your own JSON / JSON Lines / CSV / Parquet files or `datasets` folders, for training and
evaluation through the same commands as the built-in tasks."""

import json

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, pipeline

from modeling_essm import build_fast_tokenizer
from modeling_essm.evaluation import eval_budgets
from modeling_essm.tasks import BYTE_PAD_ID, BYTE_VOCAB_SIZE, load_task
from modeling_essm.training import load_run_config, train

REVIEWS = [("a fine, moving film", "pos"), ("dull and far too long", "neg"), ("Ébloui: superbe", "pos"),
           ("a waste of two hours", "neg"), ("warm and funny", "pos"), ("noisy, empty, loud", "neg")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def review_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in REVIEWS * 4])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    return train, evaluation


def test_text_and_label_names_become_byte_ids_and_sorted_label_ids(review_files):
    train, evaluation = review_files
    task = load_task("files", train_file=str(train), eval_file=str(evaluation), max_length=12)
    assert task.num_labels == 2 and task.label_names == ("neg", "pos") and task.metric == "accuracy"
    assert task.vocab_size == BYTE_VOCAB_SIZE and task.pad_token_id == BYTE_PAD_ID
    assert task.eval["input_ids"][2] == list("Ébloui: superbe".encode()[:12])  # UTF-8 bytes, truncated
    assert task.eval["labels"] == [1, 0, 1, 0, 1, 0]


def test_csv_parquet_and_datasets_folders_read_alike(tmp_path):
    rows = {"text": ["ab", "cd", "ef", "gh"], "label": [0, 1, 2, 1]}
    table = datasets.Dataset.from_dict(rows)
    table.to_csv(tmp_path / "data.csv", index=False)
    table.to_parquet(tmp_path / "data.parquet")
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "folder")
    loaded = [load_task("files", train_file=str(tmp_path / name), eval_file=str(tmp_path / name))
              for name in ("data.csv", "data.parquet", "folder")]
    subset = load_task("files", train_file=str(tmp_path / "data.csv"), eval_file=str(tmp_path / "data.csv"),
                       train_size=2, eval_size=2)
    assert len(subset.train) == 2 and subset.num_labels == 3  # a class left out of the subset still has its id
    for task in loaded:
        assert task.num_labels == 3 and task.label_names is None
        assert task.train["input_ids"] == [list(b"ab"), list(b"cd"), list(b"ef"), list(b"gh")]
        assert task.train["labels"] == [0, 1, 2, 1]


def test_language_modelling_cuts_each_text_into_chunks(tmp_path):
    text = "To be, or not to be, that is the question."  # 42 bytes: chunks of 16, 16 and 10
    write_jsonl(tmp_path / "lm.jsonl", [{"text": text}, {"text": "x"}])  # a 1-byte row predicts nothing
    task = load_task("files", train_file=str(tmp_path / "lm.jsonl"), eval_file=str(tmp_path / "lm.jsonl"),
                     objective="language_modeling", max_length=16)
    assert task.metric == "bits_per_byte" and task.num_labels is None
    assert task.eval["input_ids"] == [list(text.encode()[i:i + 16]) for i in (0, 16, 32)]
    assert task.eval["labels"] == task.eval["input_ids"]


def test_token_ids_need_a_vocabulary_size(tmp_path):
    write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 5, 7], "label": 1}, {"input_ids": [2, 3], "label": 0}])
    paths = dict(train_file=str(tmp_path / "ids.jsonl"), eval_file=str(tmp_path / "ids.jsonl"))
    with pytest.raises(ValueError, match="input_ids needs the task's vocab_size"):
        load_task("files", **paths)
    task = load_task("files", **paths, vocab_size=8)
    assert task.vocab_size == 8 and task.pad_token_id is None and task.train["input_ids"] == [[1, 5, 7], [2, 3]]


@pytest.mark.parametrize("options, error, message", [
    (dict(train_file="missing.jsonl"), FileNotFoundError, "data file not found"),
    (dict(train_file="data.txt"), ValueError, "pass a .json, .jsonl, .csv or .parquet file"),
    (dict(text_column="review"), ValueError, "neither an input_ids nor a 'review' column"),
    (dict(label_column="stars"), ValueError, "no 'stars' column for the labels"),
    (dict(eval_file="unknown.jsonl"), ValueError, r"labels \['meh'\] are not among the known \['neg', 'pos'\]"),
    (dict(objective="regression"), ValueError, "objective must be one of classification, language_modeling"),
    (dict(eval_file=None), ValueError, "the files task needs eval_file"),
])
def test_bad_files_and_settings_name_the_problem(review_files, tmp_path, options, error, message):
    (tmp_path / "data.txt").write_text("text")
    write_jsonl(tmp_path / "unknown.jsonl", [{"text": "so-so", "label": "meh"}])
    settings = {**dict(train_file="train.jsonl", eval_file="eval.jsonl", data_dir=str(tmp_path)), **options}
    with pytest.raises(error, match=message):
        load_task("files", **settings)


def test_essm_train_and_the_budget_sweep_run_on_your_own_files(review_files, tmp_path):
    train_file, eval_file = review_files
    config = {
        "task": {"name": "files", "train_file": str(train_file), "eval_file": str(eval_file), "max_length": 32},
        "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_spectral_filters": 4, "intermediate_size": 0},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "use_cpu": True, "report_to": [],
                     "disable_tqdm": True, "per_device_train_batch_size": 8},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    train(load_run_config(tmp_path / "run.yaml"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run").eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    rows, _ = eval_budgets(tmp_path / "run", budgets=[2, 4], output_dir=tmp_path / "sweep")
    assert [row["budget"] for row in rows] == [2, 4] and all(0 <= row["accuracy"] <= 1 for row in rows)
    # The folder is a text classifier with its tokenizer: a pipeline answers with the label names.
    classify = pipeline("text-classification", model=tmp_path / "run")
    assert classify("warm and funny")[0]["label"] in ("neg", "pos")
    with torch.no_grad():
        ids = build_fast_tokenizer()("warm and funny", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, 2)


def test_the_budget_sweep_reads_your_data_for_any_saved_model(review_files, tmp_path):
    from conftest import tiny_config

    from modeling_essm import ESSSMForSequenceClassification
    from modeling_essm.cli import eval_budgets_main
    from modeling_essm.evaluation import measure
    from modeling_essm.training import PaddingCollator

    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(num_labels=2, id2label={0: "neg", 1: "pos"})).eval()
    model.save_pretrained(tmp_path / "model")  # a plain folder: no run config
    build_fast_tokenizer().save_pretrained(tmp_path / "model")
    _, evaluation = review_files
    eval_budgets_main([str(tmp_path / "model"), "--data", str(evaluation), "--budgets", "2", "8",
                       "--output-dir", str(tmp_path / "sweep")])
    rows = json.loads((tmp_path / "sweep" / "budget_sweep.json").read_text())["results"]
    ids = [list(text.encode()) for text, _ in REVIEWS]
    rows_by_hand = datasets.Dataset.from_dict({"input_ids": ids, "labels": [int(y == "pos") for _, y in REVIEWS]})
    expected = measure(model, rows_by_hand, PaddingCollator(pad_token_id=256), {k: {"spectral_budget": k}
                                                                                   for k in (2, 8)})
    assert [row["loss"] for row in rows] == pytest.approx([expected[k]["loss"] for k in (2, 8)])
