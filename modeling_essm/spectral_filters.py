"""Fixed spectral filters of ES-SSM: the top eigenpairs of the L x L Hankel matrix

    Z[i, j] = h[i + j],  h[m] = 2 / (m^3 - m),  i, j = 1..L   (Z = moments of (1-x)^2 dx on [0, 1])

Z is positive definite and totally positive, so sigma_1 > sigma_2 > ... > 0 decay geometrically and
phi_k has k-1 sign changes. Z x is a correlation with h, so a block of matvecs is one rFFT of size
>= 2L; randomized subspace iteration on it plus a small Rayleigh-Ritz eigh gives the top K in
O(K L log L + K^2 L) time instead of the O(L^3) of a dense eigh.
"""

import hashlib
import os
import tempfile
import warnings
from numbers import Integral
from pathlib import Path

import torch

OVERSAMPLING = 10  # sigma drops ~2x or more per channel, so each sweep shrinks errors by ~2^-10 or better
POWER_ITERATIONS = 4  # 2 already reach float64 noise at L = 16384 and 65536; 4 leave a margin
SEED = 0
DENSE_CORNER = 32  # entries Z[i, j] with i + j <= 32 are applied densely, see _hankel_matvec
CACHE_FORMAT = 1


def _check_arguments(seq_len, num_filters):
    if not isinstance(seq_len, Integral) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if not isinstance(num_filters, Integral) or isinstance(num_filters, bool) or not 1 <= num_filters <= seq_len:
        raise ValueError(f"num_filters must be an int in [1, seq_len={seq_len}], got {num_filters!r}")
    return int(seq_len), int(num_filters)


def _hankel_matvec(seq_len):
    """Return x -> Z @ x for x of shape (L, b): a small dense corner plus one FFT correlation."""
    # FFT round-off is ~eps * ||h|| * ||x|| in every output, which would blur eigenvalues below
    # eps * sigma_1 ~ 1e-16. The large h[m] only fill the corner i + j <= DENSE_CORNER, so apply that densely
    # (round-off then scales with the entries, as in dense eigh) and FFT the tail, whose norm is ~1e-4.
    m = torch.arange(2, 2 * seq_len + 1, dtype=torch.float64)
    tail = torch.where(m > DENSE_CORNER, 2.0 / (m**3 - m), 0.0)  # tail[n] = h[n + 2], n = i + j for 0-based i, j
    # a circular correlation of size >= 2L-1 leaves outputs L-1..2L-2 free of wrap-around
    fft_size = 1 << (2 * seq_len - 1).bit_length()
    tail_hat = torch.fft.rfft(tail, n=fft_size).unsqueeze(1)
    rows = torch.arange(1, min(DENSE_CORNER, seq_len + 1), dtype=torch.float64)
    s = rows[:, None] + rows[None, :]
    corner = torch.where(s <= DENSE_CORNER, 2.0 / (s**3 - s), 0.0)

    def matvec(x):
        x_hat = torch.fft.rfft(x.flip(0), n=fft_size, dim=0)
        zx = torch.fft.irfft(tail_hat * x_hat, n=fft_size, dim=0)[seq_len - 1 : 2 * seq_len - 1]
        zx[: len(corner)] += corner @ x[: len(corner)]
        return zx

    return matvec


def _fix_signs(vectors):
    # largest-|entry| positive: leading filters have a clear peak (opposite lobes differ by >= 1% in
    # magnitude), whereas their first entries shrink ~2x per channel and would decide signs on noise
    peak_rows = vectors.abs().argmax(dim=0, keepdim=True)
    return vectors * torch.gather(vectors, 0, peak_rows).sign()


def hankel_eigenpairs(seq_len: int, num_filters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `num_filters` eigenpairs of the seq_len x seq_len Hankel matrix Z[i,j] = 2/((i+j)^3-(i+j)), i,j=1..L.

    Returns (eigenvalues (K,) float64, descending; filters (L, K) float64, column k = k-th eigenvector,
    unit norm, entry of largest magnitude positive). Randomized subspace iteration with FFT matvecs,
    seeded, so the result is reproducible for one machine and thread count (one thread instead of two moved
    sigma_18 at L=512 by 1.1e-18). Eigenvalues are resolved down to ~1e-18 absolute; below that
    they may come out as tiny negatives and their vectors are arbitrary directions in the noise subspace.
    """
    seq_len, num_filters = _check_arguments(seq_len, num_filters)
    matvec = _hankel_matvec(seq_len)
    block = min(num_filters + OVERSAMPLING, seq_len)
    generator = torch.Generator().manual_seed(SEED)
    basis = torch.randn(seq_len, block, generator=generator, dtype=torch.float64)
    for _ in range(POWER_ITERATIONS):
        basis, _ = torch.linalg.qr(matvec(basis))
    projected = basis.T @ matvec(basis)
    eigenvalues, ritz = torch.linalg.eigh((projected + projected.T) / 2)
    eigenvalues = eigenvalues.flip(0)[:num_filters].contiguous()
    filters = _fix_signs(basis @ ritz.flip(1)[:, :num_filters])
    return eigenvalues, filters.contiguous()


def default_cache_dir() -> Path:
    root = os.environ.get("ESSM_CACHE_DIR")
    return Path(root) / "filters" if root else Path.home() / ".cache" / "modeling_essm" / "filters"


def _digest(eigenvalues, filters):
    return hashlib.sha256(eigenvalues.numpy().tobytes() + filters.numpy().tobytes()).hexdigest()


def _load_cached(path, seq_len, num_filters):
    """Cached (eigenvalues, filters), or None when the file is missing, unreadable or fails its checksum."""
    try:
        entry = torch.load(path, weights_only=True)
        eigenvalues, filters = entry["eigenvalues"], entry["filters"]
        intact = (
            entry["format"] == CACHE_FORMAT
            and eigenvalues.dtype == filters.dtype == torch.float64
            and eigenvalues.shape == (num_filters,)
            and filters.shape == (seq_len, num_filters)
            and entry["sha256"] == _digest(eigenvalues, filters)
        )
    except Exception:  # any damage to the file (truncation, bit flips, foreign content) means recompute
        return None
    return (eigenvalues, filters) if intact else None


def _save_atomically(path, eigenvalues, filters):
    entry = {"format": CACHE_FORMAT, "eigenvalues": eigenvalues, "filters": filters,
             "sha256": _digest(eigenvalues, filters)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            torch.save(entry, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)  # readers see the old file or the whole new one, never a half
    except BaseException:
        os.unlink(tmp_name)
        raise


def spectral_filters(
    seq_len: int, num_filters: int, cache_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hankel_eigenpairs(seq_len, num_filters)` through an on-disk cache keyed by (L, K).

    Default cache dir: $ESSM_CACHE_DIR/filters if set, else ~/.cache/modeling_essm/filters. A hit returns
    bitwise-identical tensors; a corrupt or unreadable file is recomputed and rewritten. An unwritable cache
    dir only costs a warning: the filters are still returned.
    """
    seq_len, num_filters = _check_arguments(seq_len, num_filters)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"hankel_L{seq_len}_K{num_filters}.pt"
    cached = _load_cached(path, seq_len, num_filters)
    if cached is not None:
        return cached
    eigenvalues, filters = hankel_eigenpairs(seq_len, num_filters)
    try:
        _save_atomically(path, eigenvalues, filters)
    except OSError as error:
        warnings.warn(f"could not cache spectral filters at {path}: {error}")
    return eigenvalues, filters


def num_filters_for_length(seq_len: int, min_scale: float = 0.01) -> int:
    """The full budget K that suits sequences of up to `seq_len`: the channels whose sigma^(1/4) is >= `min_scale`.

    Channel j reaches the output scaled by sigma_j^(1/4), which falls about 1.3-1.5x per channel (at L=256 it is
    below 0.01 from the 12th channel on) while every channel costs a D x D projection per block; parameters
    spent on channels that carry almost nothing are better spent on width (docs/training.md). At least 2, so that
    there is a budget to shrink to; `sigma_j` grows with L, so longer sequences get a few more channels.
    """
    seq_len, _ = _check_arguments(seq_len, 1)
    if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 < min_scale < 1:
        raise ValueError(f"min_scale must be a number in (0, 1), got {min_scale!r}")
    eigenvalues, _ = spectral_filters(seq_len, min(seq_len, 64))
    strong = int((eigenvalues.clamp_min(0.0) ** 0.25 >= min_scale).sum())
    return min(seq_len, max(2, strong))
