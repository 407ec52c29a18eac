"""Tiny stand-ins for the shared data's archives, built in a test's folder."""

import io
import tarfile
import wave

import numpy as np


def add_to_tar(archive, name, data):
    member = tarfile.TarInfo(name)
    member.size = len(data)
    archive.addfile(member, io.BytesIO(data))


def wav_bytes(samples, channels=1):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return buffer.getvalue()


def fsdd_archive(folder, recordings):
    with tarfile.open(folder / "fsdd_recordings.tgz", "w:gz") as archive:
        for name, data in recordings.items():
            add_to_tar(archive, f"recordings/{name}", data)
    return folder
