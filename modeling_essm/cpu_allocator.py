"""Keep freed CPU memory for reuse: with glibc, CPU code that frees and re-allocates large buffers runs faster.

glibc serves every allocation over 32 MB (and, by default, many over 128 kB) with fresh pages from
mmap and returns them to the system on free. PyTorch frees and re-allocates the same large buffers
at every layer and step (FFT spectra, activations), so each one is faulted in and zeroed by the
kernel again: measured at half of an ES-SSM training step and 44% of the mixer's inference time (L=4096) before
the mixer's training chunks ran in reused buffers. Training no longer needs it: with the recomputing operators, the
switch moved the reference LM's training speed to 0.91-1.03x of its rate without (medians over paired rounds at 512
to 4,096 tokens, before the saved convolutions: docs/training_speed.json as of commit 644e3c4), where it had sped up
the checkpointed chunks by 41% at 1,024 tokens (docs/performance.md). Nor does inference, since it runs the same
forward operator: in a plain process the reference LM's forward takes 0.9-1.2x its time with the switch, where it
took about 2x (probes at 1 x 4,096 and 8 x 1,024 tokens, docs/performance.md).
Keeping freed memory on the heap removes that cost for any model, at the price of a resident set that stays at
its peak. It is process-wide, so the package never changes it on import, and no library function does; our
commands (essm-train, essm-eval-budgets, essm-compare) switch it on for their own process only when asked to with
ESSM_REUSE_FREED_MEMORY=1, and users can call it too. On the main job's training (scripts/run_main.sh) it cut the
minor page faults from 1.6-1.9 GB to 0.6 GB, and the time without it was 0.94-1.18x the time with it over five
alternating pairs of runs (median 1.01x): within this machine's drift (docs/performance.md).
Environment equivalent: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647.
"""

import ctypes
import os

REQUEST_VARIABLE = "ESSM_REUSE_FREED_MEMORY"

# glibc's mallopt parameters and their defaults (malloc.h, mallopt(3)).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory on the heap for reuse (True), or hand it back as glibc's default settings do (False).

    False restores the default values but not glibc's adaptive thresholds, which setting any threshold turns off
    (mallopt(3); both branches here set two): from then on every allocation above the mmap threshold reached so far
    (128 kB if no large block had been freed) gets fresh pages, where a process that never switched raises that
    threshold to reuse freed blocks of up to 32 MB. Only a fresh process has glibc's full defaults.
    Returns whether the setting took effect: False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim_threshold = (0, NEVER_TRIM) if enabled else (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
    applied = libc.mallopt(M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    if not enabled:
        libc.malloc_trim(0)  # hand back what the reuse setting kept
    return applied


class AllocatorRequestError(ValueError):
    """$ESSM_REUSE_FREED_MEMORY holds neither 0 nor 1; commands print it as one line."""


def reuse_freed_memory_requested() -> bool:
    """Whether $ESSM_REUSE_FREED_MEMORY asks a command to keep freed memory: 1 yes; 0, empty or unset no."""
    value = os.environ.get(REQUEST_VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise AllocatorRequestError(f"{REQUEST_VARIABLE} must be 1 (keep freed memory for reuse) or 0 (glibc's "
                                    f"defaults, also when unset), got {value!r}.")
    return value == "1"


def reuse_freed_memory_in_command(requested: bool) -> bool:
    """What a command calls once its checks have passed, with `reuse_freed_memory_requested()` read before them:
    `reuse_freed_memory()` if requested. Returns whether the setting is on."""
    return reuse_freed_memory() if requested else False
