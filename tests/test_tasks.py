"""Task data modules on tiny generated data and tiny fake archives (no shared data needed)."""

import dataclasses
import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fake_archives import add_to_tar, fsdd_archive, wav_bytes

from modeling_essm.tasks import TASK_NAMES, TaskData, image, listops, load_task
from modeling_essm.tasks._common import choose_rows, resolve_data_dir
from modeling_essm.training import PaddingCollator


# ---------------------------------------------------------------- ListOps


@pytest.mark.parametrize(
    "expression, value",
    [
        ("7", 7),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 5 [MAX 1 8 ] 3 ]", 3),
        ("[MED 5 1 3 ]", 3),
        ("[MED 1 2 3 4 ]", 2),  # even count: mean of 2 and 3, truncated
        ("[MED 3 9 ]", 6),
        ("[MED 0 9 8 1 ]", 4),  # middle values 1 and 8 -> 4.5 -> 4
        ("[SM 7 8 9 ]", 4),  # 24 mod 10
        ("[SM [MAX 1 2 ] [MED 0 9 ] [SM 9 9 ] ]", 4),  # 2 + 4 + 8 = 14
    ],
)
def test_listops_evaluates_hand_written_expressions(expression, value):
    assert listops.evaluate(listops.encode(expression)) == value


@pytest.mark.parametrize("expression", ["[MAX 1 2", "1 2", "[MIN ]", "]", ""])
def test_listops_rejects_malformed_expressions(expression):
    with pytest.raises(ValueError):
        listops.evaluate(listops.encode(expression))


def test_listops_vocabulary():
    assert listops.PAD_ID == 0
    assert listops.encode("0 1 2 3 4 5 6 7 8 9 [MIN [MAX [MED [SM ]") == list(range(1, 16))
    assert listops.decode(listops.encode("[SM 1 [MED 2 3 ] ]") + [0, 0]) == "[SM 1 [MED 2 3 ] ]"


def test_listops_tokenizer_reads_expressions_as_encode_does():
    tokenizer = listops.build_tokenizer()
    for row in small_listops().eval:
        expression = listops.decode(row["input_ids"])
        assert tokenizer(expression).input_ids == row["input_ids"]
        assert tokenizer.decode(row["input_ids"]) == expression
    with pytest.raises(Exception, match="UNK"):  # no unknown token: a typo is an error, not a silent id
        tokenizer("[MAX 2 x ]")


def small_listops(seed=0, train_size=40, eval_size=15):
    return load_task("listops", max_length=80, min_length=30, train_size=train_size, eval_size=eval_size, seed=seed)


def test_listops_splits_follow_the_rules():
    task = small_listops()
    assert isinstance(task, TaskData)
    assert (task.name, task.num_labels, task.vocab_size, task.input_size) == ("listops", 10, 16, None)
    assert (task.pad_token_id, task.max_length, task.metric) == (0, 80, "accuracy")
    assert (len(task.train), len(task.eval)) == (40, 15)
    seen = set()
    for row in [*task.train, *task.eval]:
        ids = row["input_ids"]
        assert 30 <= len(ids) <= 80
        assert all(1 <= i < 16 for i in ids)
        assert listops.evaluate(ids) == row["labels"]
        assert ids[-1] == listops.CLOSE_ID
        seen.add(tuple(ids))
    assert len(seen) == 55  # de-duplicated within and across splits


def test_listops_respects_the_depth_limit():
    for row in small_listops(seed=5).train:
        depth = deepest = 0
        for i in row["input_ids"]:
            depth += 1 if 11 <= i <= 14 else -1 if i == listops.CLOSE_ID else 0
            deepest = max(deepest, depth)
        assert deepest < listops.MAX_DEPTH  # operators live at depths 1..9, leaves below


def test_listops_is_deterministic_for_a_seed():
    a, b, c = small_listops(seed=3), small_listops(seed=3), small_listops(seed=4)
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["labels"] == b.eval["labels"]
    assert a.train["input_ids"] != c.train["input_ids"]
    # eval is drawn first, so it does not depend on train_size
    assert small_listops(seed=3, train_size=5).eval["input_ids"] == a.eval["input_ids"]


def test_listops_ignores_data_dir(tmp_path):
    task = load_task("listops", data_dir=tmp_path / "absent", max_length=60, min_length=20, train_size=3, eval_size=2)
    assert len(task.train) == 3


@pytest.mark.parametrize("kwargs", [{"max_length": 10}, {"max_length": 100_000}, {"min_length": 90}, {"min_length": 0}])
def test_listops_rejects_bad_windows(kwargs):
    with pytest.raises(ValueError):
        load_task("listops", **{"max_length": 80, "train_size": 2, "eval_size": 2, **kwargs})


# ---------------------------------------------------------------- arguments shared by all tasks


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        load_task("pathfinder")
    assert all(name in str(error.value) for name in TASK_NAMES)


@pytest.mark.parametrize(
    "kwargs", [{"train_size": 0}, {"eval_size": -3}, {"train_size": True}, {"train_size": 2.5}, {"seed": -1}]
)
def test_bad_sizes_and_seeds_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        load_task("listops", **kwargs)


def test_task_data_is_frozen():
    task = small_listops(train_size=2, eval_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.max_length = 3


def test_balanced_rows_share_out_what_a_small_class_cannot_give():
    labels = [0] * 10 + [1] * 2 + [2] * 5
    rows = choose_rows(len(labels), 9, seed=0, labels=labels)
    assert list(rows) == sorted(rows) and len(set(rows)) == 9
    assert np.bincount(np.asarray(labels)[rows]).tolist() == [4, 2, 3]
    assert list(choose_rows(len(labels), 9, seed=0, labels=labels)) == list(rows)
    with pytest.raises(ValueError, match="only 17"):
        choose_rows(len(labels), 18, seed=0, labels=labels)


# ---------------------------------------------------------------- data folder


def test_missing_data_folder_says_where_and_how(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as error:
        load_task("text", data_dir=absent)
    assert str(absent) in str(error.value) and "ESSM_DATA_DIR" in str(error.value) and "data_dir" in str(error.value)


def test_missing_data_file_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10_jpeg.tar.gz"):
        load_task("image", data_dir=tmp_path)


def test_data_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSM_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    (tmp_path / "explicit").mkdir()
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_default_data_folder_is_shared_data_beside_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("ESSM_DATA_DIR", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")  # where the package is installed plays no part
    assert resolve_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()


def test_bad_max_length_fails_before_reading_data(tmp_path):
    # tmp_path holds no data, so a FileNotFoundError would mean the data was looked up first
    for name, max_length in [("text", 4097), ("text", 0), ("image", 512), ("audio", 0), ("lm", 1)]:
        with pytest.raises(ValueError, match="max_length"):
            load_task(name, data_dir=tmp_path, max_length=max_length)


# ---------------------------------------------------------------- text (IMDb bytes)


@pytest.fixture
def imdb_dir(tmp_path):
    reviews = [
        ("train", 0, "Dull."),
        ("train", 1, "Très bien!"),  # two-byte é
        ("train", 0, "x" * 50),
        ("train", 1, "Loved it."),
        ("test", 1, "Great"),
        ("test", 0, "Bad"),
    ]
    with gzip.open(tmp_path / "imdb.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, (split, label, text) in enumerate(reviews):
            review = {"split": split, "id": i, "rating": 9 if label else 2, "label": label, "text": text}
            f.write(json.dumps(review) + "\n")
    return tmp_path


def test_text_is_utf8_bytes_truncated_to_max_length(imdb_dir):
    task = load_task("text", data_dir=imdb_dir, max_length=12)
    assert (task.num_labels, task.vocab_size, task.pad_token_id, task.max_length) == (2, 259, 256, 12)
    assert task.train[1]["input_ids"] == list("Très bien!".encode("utf-8"))
    assert task.train[2]["input_ids"] == [ord("x")] * 12
    assert task.train["labels"] == [0, 1, 0, 1] and task.eval["labels"] == [1, 0]
    assert bytes(task.eval[0]["input_ids"]) == b"Great"


def test_text_subsets_are_balanced_and_seeded(imdb_dir):
    picks = [load_task("text", data_dir=imdb_dir, train_size=2, eval_size=1, seed=s) for s in (0, 0, 1, 2, 3)]
    assert all(sorted(task.train["labels"]) == [0, 1] and len(task.eval) == 1 for task in picks)
    assert picks[0].train["input_ids"] == picks[1].train["input_ids"]
    assert len({tuple(map(tuple, task.train["input_ids"])) for task in picks}) > 1


# ---------------------------------------------------------------- image (CIFAR-10 JPEG)


def jpeg_bytes(top, bottom):
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:16], pixels[16:] = top, bottom
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSM_CACHE_DIR", str(tmp_path / "cache"))
    with tarfile.open(tmp_path / "cifar10_jpeg.tar.gz", "w:gz") as archive:
        add_to_tar(archive, "train/truck/0001.jpg", jpeg_bytes((255, 255, 255), (0, 0, 0)))
        add_to_tar(archive, "train/airplane/0007.jpg", jpeg_bytes((0, 0, 0), (255, 0, 0)))
        add_to_tar(archive, "test/cat/0002.jpg", jpeg_bytes((0, 0, 255), (0, 255, 0)))
    return tmp_path


def test_image_is_grayscale_raster_order_and_cached(cifar_dir, monkeypatch):
    task = load_task("image", data_dir=cifar_dir)
    assert (task.num_labels, task.vocab_size, task.max_length) == (10, 256, 1024)
    assert task.train["labels"] == [0, 9] and task.eval["labels"] == [3]  # sorted by class
    airplane, truck = (np.array(row["input_ids"]) for row in task.train)
    assert airplane.shape == truck.shape == (1024,)
    assert abs(truck[:16 * 32].mean() - 255) < 3 and truck[16 * 32:].mean() < 3  # white rows come first
    assert abs(airplane[-1] - 76) < 4  # pure red -> luma 0.299 * 255
    assert len(list((cifar_dir / "cache").glob("cifar10_gray_*.npz"))) == 1
    monkeypatch.setattr(image, "decode_archive", lambda path: pytest.fail("decoded twice"))
    assert load_task("image", data_dir=cifar_dir).train["input_ids"] == task.train["input_ids"]


# ---------------------------------------------------------------- audio (Free Spoken Digit)


def test_audio_is_scaled_padded_cropped_and_split_by_take(tmp_path):
    ramp = np.arange(-50, 50) * 600  # 100 samples reaching -30000 .. 29400
    recordings = {
        "3_alice_4.wav": wav_bytes(ramp[:10]),  # take 4: test
        "3_alice_5.wav": wav_bytes(ramp),
        "7_bob_12.wav": wav_bytes([-32768, 32767]),
    }
    data_dir = fsdd_archive(tmp_path, recordings)
    task = load_task("audio", data_dir=data_dir, max_length=40)
    assert (task.num_labels, task.vocab_size, task.input_size, task.max_length) == (10, None, 1, 40)
    assert task.train["labels"] == [3, 7] and task.eval["labels"] == [3]
    cropped, extremes = (np.array(row["input_values"]) for row in task.train)
    np.testing.assert_allclose(cropped, ramp[:40] / 32768)
    assert extremes.shape == (40,) and extremes[0] == -1.0 and 0.9999 < extremes[1] < 1 and not extremes[2:].any()
    np.testing.assert_allclose(task.eval[0]["input_values"][:10], ramp[:10] / 32768)
    assert not any(task.eval[0]["input_values"][10:])


def test_audio_frames_are_consecutive_samples_and_the_batch_has_frame_features(tmp_path):
    ramp = np.arange(-50, 50) * 600
    data_dir = fsdd_archive(tmp_path, {"3_alice_5.wav": wav_bytes(ramp), "7_bob_4.wav": wav_bytes(ramp[:30])})
    task = load_task("audio", data_dir=data_dir, max_length=40, frame_size=8)
    assert (task.input_size, task.max_length) == (8, 5)
    frames = np.array(task.train[0]["input_values"])
    np.testing.assert_allclose(frames, (ramp[:40] / 32768).reshape(5, 8))
    batch = PaddingCollator(pad_token_id=None)([task.train[0], task.eval[0]])
    assert batch["input_values"].shape == (2, 5, 8) and batch["attention_mask"].all()
    np.testing.assert_allclose(batch["input_values"][1].reshape(-1)[:30].numpy(), ramp[:30] / 32768, rtol=1e-6)
    assert not batch["input_values"][1].reshape(-1)[30:].any()
    for bad, match in [(dict(max_length=40, frame_size=6), "multiple of frame_size"), (dict(frame_size=0), "frame_size")]:
        with pytest.raises(ValueError, match=match):
            load_task("audio", data_dir=data_dir, **bad)


def test_audio_rejects_recordings_in_another_format(tmp_path):
    data_dir = fsdd_archive(tmp_path, {"1_carol_9.wav": wav_bytes([0, 0, 0, 0], channels=2)})
    with pytest.raises(ValueError, match="1_carol_9.wav"):
        load_task("audio", data_dir=data_dir)


# ---------------------------------------------------------------- lm (Tiny Shakespeare bytes)


def test_lm_chunks_the_first_90_and_last_10_percent(tmp_path):
    text = bytes(range(256)) * 4  # 1024 bytes: 921 train, 103 eval
    (tmp_path / "tinyshakespeare.txt").write_bytes(text)
    task = load_task("lm", data_dir=tmp_path, max_length=16)
    assert (task.num_labels, task.vocab_size, task.pad_token_id, task.metric) == (None, 259, 256, "bits_per_byte")
    assert (len(task.train), len(task.eval)) == (921 // 16, 103 // 16)
    assert bytes(task.train[1]["input_ids"]) == text[16:32]
    assert bytes(task.eval[0]["input_ids"]) == text[921:937]
    assert task.train["labels"] == task.train["input_ids"]
    subset = load_task("lm", data_dir=tmp_path, max_length=16, train_size=5, eval_size=2, seed=7)
    assert (len(subset.train), len(subset.eval)) == (5, 2)
    assert set(map(tuple, subset.train["input_ids"])) <= set(map(tuple, task.train["input_ids"]))
    again = load_task("lm", data_dir=tmp_path, max_length=16, train_size=5, seed=7)
    assert subset.train["input_ids"] == again.train["input_ids"]


# ---------------------------------------------------------------- the real shared data, when present


def real_data_dir():
    try:
        return resolve_data_dir()
    except FileNotFoundError as missing:
        pytest.skip(f"shared data folder absent ({missing})")


def test_real_lm_and_audio_have_the_documented_sizes():
    data_dir = real_data_dir()
    lm_task = load_task("lm", data_dir=data_dir, max_length=256)
    assert (len(lm_task.train), len(lm_task.eval)) == (1_003_854 // 256, 111_540 // 256)
    audio_task = load_task("audio", data_dir=data_dir, eval_size=20)
    assert len(audio_task.train) == 2700 and np.bincount(audio_task.eval["labels"]).tolist() == [2] * 10


def test_real_text_is_balanced_and_truncated():
    task = load_task("text", data_dir=real_data_dir(), max_length=256, train_size=10, eval_size=10, seed=1)
    assert sorted(task.train["labels"]) == [0] * 5 + [1] * 5
    assert max(map(len, task.eval["input_ids"])) <= 256


@pytest.mark.slow
def test_real_image_decodes_all_of_cifar(tmp_path, monkeypatch):
    data_dir = real_data_dir()
    monkeypatch.setenv("ESSM_CACHE_DIR", str(tmp_path))
    task = load_task("image", data_dir=data_dir)
    assert (len(task.train), len(task.eval)) == (50_000, 10_000)
    assert np.bincount(task.eval["labels"]).tolist() == [1000] * 10
