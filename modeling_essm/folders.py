"""Folders the commands write for a user: only new or empty ones, and all at once or not at all."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_new_folder(path, flag: str) -> Path:
    """`path` as a Path when it is new or an empty folder: nothing the user saved is overwritten. ValueError names
    `flag` (the option that gave the path) otherwise."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{flag} {path} exists and is not an empty folder: name a new one")
    return path


@contextlib.contextmanager
def written_atomically(destination: Path):
    """Yields a staging folder beside `destination` (checked new or empty); it becomes `destination` when the block
    ends without error, and is removed otherwise."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        yield staging
        if destination.exists():
            destination.rmdir()  # empty, as checked before any work
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
