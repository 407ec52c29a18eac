"""Free Spoken Digit Dataset as raw audio: 8 kHz mono int16 WAVs scaled to float32 in
[-1, 1), zero-padded or cut at the end to max_length samples (default 8,000 = 1 s), label =
the spoken digit. Standard split: take index 0-4 is test (300 files), 5-49 train (2,700).

With `frame_size` f > 1 each step of the sequence is a frame of f consecutive samples, so the
model reads max_length / f steps of f features: one sample per step (f = 1) makes even
1,000-step recordings hard to learn from in minutes of training, for every architecture."""

import io
import re
import tarfile
import wave

import numpy as np

from ._common import TaskData, check_max_length, check_positive_int, choose_rows, data_file, labelled_dataset

FILENAME = "fsdd_recordings.tgz"
SAMPLE_RATE = 8000
DEFAULT_MAX_LENGTH = 8000
LONGEST = 16000
DIGITS = tuple(str(d) for d in range(10))
TEST_TAKES = 5  # takes 0..4 of every speaker and digit
_RECORDING = re.compile(r"(?:.*/)?(\d)_([A-Za-z]+)_(\d+)\.wav")


def read_waveform(wav_file, name: str, length: int) -> np.ndarray:
    with wave.open(wav_file) as wav:
        if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError(f"{name}: expected 8 kHz mono 16-bit PCM")
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")[:length]
    waveform = np.zeros(length, dtype=np.float32)
    waveform[: len(samples)] = samples / 32768.0
    return waveform


def read_recordings(path, length: int) -> dict:
    """{"train": [(file name, digit, waveform)], "test": [...]}, sorted by file name."""
    splits = {"train": [], "test": []}
    with tarfile.open(path, "r|gz") as archive:
        for member in archive:
            match = _RECORDING.fullmatch(member.name)
            if not member.isfile() or not match:
                continue
            digit, take = int(match[1]), int(match[3])
            # wave seeks past extra chunks; a streamed archive member cannot seek
            wav_bytes = io.BytesIO(archive.extractfile(member).read())
            waveform = read_waveform(wav_bytes, member.name, length)
            splits["test" if take < TEST_TAKES else "train"].append((member.name, digit, waveform))
    for recordings in splits.values():
        recordings.sort(key=lambda recording: recording[0])
    return splits


def load(data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0, frame_size=1) -> TaskData:
    """FSDD train and test splits with `input_values` and `labels`; sizes take a seeded balanced
    subset. `input_values` holds max_length floats, or with frame_size > 1 max_length / frame_size
    frames of frame_size floats (max_length must then be a multiple of frame_size)."""
    max_length = check_max_length("audio", max_length, 1, LONGEST, DEFAULT_MAX_LENGTH)
    check_positive_int("frame_size", frame_size, allow_none=False)
    if max_length % frame_size:
        raise ValueError(f"max_length ({max_length}) must be a multiple of frame_size ({frame_size}) for 'audio'")
    splits = read_recordings(data_file(data_dir, FILENAME), max_length)
    datasets = {}
    for split, size in (("train", train_size), ("test", eval_size)):
        labels = np.array([digit for _, digit, _ in splits[split]], dtype=np.int64)
        rows = choose_rows(len(labels), size, seed, labels)
        waveforms = [splits[split][i][2] if frame_size == 1 else splits[split][i][2].reshape(-1, frame_size) for i in rows]
        datasets[split] = labelled_dataset(waveforms, labels[rows], DIGITS, column="input_values", dtype="float32")
    return TaskData(
        name="audio",
        train=datasets["train"],
        eval=datasets["test"],
        num_labels=10,
        vocab_size=None,
        input_size=frame_size,
        pad_token_id=None,  # every waveform is exactly max_length samples
        max_length=max_length // frame_size,
        metric="accuracy",
    )
