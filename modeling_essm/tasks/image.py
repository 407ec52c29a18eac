"""CIFAR-10 (JPEG) as pixel sequences (LRA "Image"): each 32x32 image converted to 8-bit
grayscale (Pillow's "L", ITU-R 601 luma) and flattened in raster order to 1,024 tokens with
values 0..255. The archive is decoded once and cached as .npz (see `_common.cache_dir`)."""

import hashlib
import io
import os
import tarfile

import numpy as np

from ._common import TaskData, cache_dir, check_max_length, choose_rows, data_file, labelled_dataset

FILENAME = "cifar10_jpeg.tar.gz"
SEQUENCE_LENGTH = 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def decode_archive(path) -> dict:
    """{"train_pixels": (N, 1024) uint8, "train_labels": (N,), "test_...": ...}, rows sorted
    by (class, file name) so the order never depends on the archive's."""
    from PIL import Image  # only this task needs Pillow

    found = {"train": [], "test": []}
    with tarfile.open(path, "r|gz") as archive:  # streaming: one pass, no seeks
        for member in archive:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            split, class_name, filename = member.name.split("/")[-3:]
            image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("L")
            if image.size != (32, 32):
                raise ValueError(f"{member.name} in {path} is {image.size}, expected 32x32")
            found[split].append((CLASSES.index(class_name), filename, np.asarray(image).reshape(-1)))
    arrays = {}
    for split, images in found.items():
        if not images:
            raise ValueError(f"{path} holds no {split}/<class>/*.jpg images")
        images.sort(key=lambda item: item[:2])
        arrays[f"{split}_pixels"] = np.stack([pixels for _, _, pixels in images])
        arrays[f"{split}_labels"] = np.array([label for label, _, _ in images], dtype=np.int64)
    return arrays


def cached_arrays(path) -> dict:
    # The key changes with the archive's location, size or modification time.
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_file = cache_dir() / f"cifar10_gray_{key}.npz"
    if not cache_file.exists():
        arrays = decode_archive(path)
        partial = cache_file.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        os.replace(partial, cache_file)  # atomic, so a killed run never leaves a truncated cache
    with np.load(cache_file) as cached:
        return dict(cached)


def load(data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0) -> TaskData:
    """CIFAR-10 train (50,000) and test (10,000); sizes take a seeded balanced subset.
    max_length can only be 1024."""
    check_max_length("image", max_length, SEQUENCE_LENGTH, SEQUENCE_LENGTH, SEQUENCE_LENGTH)
    arrays = cached_arrays(data_file(data_dir, FILENAME))
    datasets = {}
    for split, size in (("train", train_size), ("test", eval_size)):
        pixels, labels = arrays[f"{split}_pixels"], arrays[f"{split}_labels"]
        rows = choose_rows(len(labels), size, seed, labels)
        datasets[split] = labelled_dataset(pixels[rows], labels[rows], CLASSES)
    return TaskData(
        name="image",
        train=datasets["train"],
        eval=datasets["test"],
        num_labels=len(CLASSES),
        vocab_size=256,
        input_size=None,
        pad_token_id=None,  # every sequence is exactly 1024 pixels
        max_length=SEQUENCE_LENGTH,
        metric="accuracy",
    )
