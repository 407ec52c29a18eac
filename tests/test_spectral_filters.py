import numpy as np
import pytest
import torch

from modeling_essm import spectral_filters as sf
from modeling_essm.spectral_filters import hankel_eigenpairs, num_filters_for_length, spectral_filters

# Float64 cannot resolve the tail to 1e-8 relative: against 40-digit mpmath at L=64 dense eigh is off by up to
# 3e-19 absolute, i.e. 2e-8 relative at sigma_13/sigma_1 = 4e-11 and 2e-7 at sigma_14/sigma_1 = 4e-12 (rounding
# Z's entries to float64 alone moves sigma_14 by 6e-9), and the subspace iteration's FFT matvecs round as well: at
# L=512 on one thread of a Xeon with AVX-512 and AMX its sigma_18 (2.9e-12) came out 1.1e-18 from dense eigh's, on two
# threads 6e-20 (every dense LAPACK driver agreeing within 5e-20). Both are far inside what a backward-stable solver
# promises (eps * sigma_1 = 8e-17). So we ask for 1e-8 relative plus this absolute floor, about 5x the worst seen,
# which only binds below sigma ~ 5e-10.
DENSE_EIGH_FLOOR = 5e-18


def dense_eigenpairs(seq_len, num_filters):
    s = np.add.outer(np.arange(1, seq_len + 1), np.arange(1, seq_len + 1)).astype(np.float64)
    eigenvalues, vectors = np.linalg.eigh(2.0 / (s**3 - s))
    return eigenvalues[::-1][:num_filters], vectors[:, ::-1][:, :num_filters]


def sign_changes(vector):
    signs = np.sign(vector[vector != 0])
    return int((signs[1:] != signs[:-1]).sum())


@pytest.mark.parametrize("seq_len, num_filters", [(16, 16), (64, 32), (256, 32), (512, 32)])
def test_matches_dense_eigh(seq_len, num_filters):
    eigenvalues, filters = hankel_eigenpairs(seq_len, num_filters)
    dense_values, dense_vectors = dense_eigenpairs(seq_len, num_filters)
    resolved = dense_values / dense_values[0] > 1e-12
    assert resolved.sum() >= 10
    np.testing.assert_allclose(eigenvalues.numpy()[resolved], dense_values[resolved], rtol=1e-8, atol=DENSE_EIGH_FLOOR)
    cosines = np.abs((filters.numpy() * dense_vectors).sum(axis=0))
    assert cosines[resolved].min() > 0.9999


def test_shapes_order_and_orthonormality():
    eigenvalues, filters = hankel_eigenpairs(512, 32)
    assert eigenvalues.shape == (32,) and filters.shape == (512, 32)
    assert eigenvalues.dtype == filters.dtype == torch.float64
    assert (eigenvalues[:-1] >= eigenvalues[1:]).all()
    torch.testing.assert_close(filters.T @ filters, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)


def test_single_entry_matrix():
    eigenvalues, filters = hankel_eigenpairs(1, 1)
    torch.testing.assert_close(eigenvalues, torch.tensor([1 / 3], dtype=torch.float64))
    assert filters.tolist() == [[1.0]]


def test_sign_convention_and_oscillation():
    # Z is totally positive, so phi_k has exactly k-1 sign changes (Gantmacher-Krein)
    _, filters = hankel_eigenpairs(1024, 16)
    peaks = filters.abs().argmax(dim=0)
    assert (filters[peaks, torch.arange(16)] > 0).all()
    assert [sign_changes(filters[:, k].numpy()) for k in range(12)] == list(range(12))


def test_bitwise_reproducible():
    first, second = hankel_eigenpairs(300, 20), hankel_eigenpairs(300, 20)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize(
    "seq_len, num_filters, message",
    [
        (0, 1, r">= 1"),
        (-5, 1, r">= 1"),
        (8.0, 2, r">= 1"),
        (True, 1, r">= 1"),
        ("8", 2, r">= 1"),
        (8, 0, r"\[1, seq_len=8\]"),
        (8, 9, r"\[1, seq_len=8\]"),
        (8, True, r"\[1, seq_len=8\]"),
        (8, 2.0, r"\[1, seq_len=8\]"),
    ],
)
def test_bad_arguments(seq_len, num_filters, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        hankel_eigenpairs(seq_len, num_filters)
    with pytest.raises(ValueError, match=message):
        spectral_filters(seq_len, num_filters, cache_dir=tmp_path)


def test_cache_miss_then_hit(tmp_path, monkeypatch):
    computed = spectral_filters(128, 8, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["hankel_L128_K8.pt"]
    assert all(torch.equal(a, b) for a, b in zip(computed, hankel_eigenpairs(128, 8)))

    monkeypatch.setattr(sf, "hankel_eigenpairs", lambda *args: pytest.fail("cache hit must not recompute"))
    cached = spectral_filters(128, 8, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(cached, computed))


def test_cache_keys_are_distinct(tmp_path):
    for seq_len, num_filters in [(64, 8), (64, 4), (32, 8)]:
        spectral_filters(seq_len, num_filters, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hankel_L32_K8.pt", "hankel_L64_K4.pt", "hankel_L64_K8.pt"]
    eigenvalues, filters = spectral_filters(64, 4, cache_dir=tmp_path)
    assert eigenvalues.shape == (4,) and filters.shape == (64, 4)


def flip_byte_in_filters(data):
    # the tensors are stored raw inside the zip: corrupt one float so that only the checksum can tell
    value = hankel_eigenpairs(64, 8)[1][10, 3].numpy().tobytes()
    assert data.count(value) == 1
    start = data.index(value)
    return data[:start] + bytes([value[0] ^ 1]) + data[start + 1 :]


@pytest.mark.parametrize(
    "corrupt",
    [lambda data: b"", lambda data: data[: len(data) // 2], lambda data: b"not a cache file", flip_byte_in_filters],
    ids=["empty", "truncated", "garbage", "bit-flip-in-data"],
)
def test_corrupt_cache_is_recomputed_and_rewritten(tmp_path, corrupt):
    expected = spectral_filters(64, 8, cache_dir=tmp_path)
    path = tmp_path / "hankel_L64_K8.pt"
    intact = path.read_bytes()
    path.write_bytes(corrupt(intact))
    recovered = spectral_filters(64, 8, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(recovered, expected))
    assert path.read_bytes() == intact


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def save_half_then_fail(obj, file):
        file.write(b"PK half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(sf.torch, "save", save_half_then_fail)
    with pytest.warns(UserWarning, match="could not cache"):
        eigenvalues, filters = spectral_filters(64, 8, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(a, b) for a, b in zip((eigenvalues, filters), hankel_eigenpairs(64, 8)))


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSM_CACHE_DIR", str(tmp_path))
    spectral_filters(32, 4)
    assert (tmp_path / "filters" / "hankel_L32_K4.pt").is_file()


@pytest.mark.parametrize("seq_len, expected", [(64, 10), (256, 11), (1024, 12), (4096, 13)])
def test_num_filters_for_length_keeps_the_channels_above_the_scale(seq_len, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("ESSM_CACHE_DIR", str(tmp_path))
    assert num_filters_for_length(seq_len) == expected
    eigenvalues, _ = spectral_filters(seq_len, expected + 1)
    scale = eigenvalues.clamp_min(0) ** 0.25
    assert scale[expected - 1] >= 0.01 > scale[expected]  # the rule itself, on the eigenvalues
    assert num_filters_for_length(seq_len, min_scale=0.05) < expected
    assert num_filters_for_length(3, min_scale=1e-3) == 3  # never more channels than the length has


@pytest.mark.parametrize("min_scale", [0, 1, -0.1, True, "0.01"])
def test_num_filters_for_length_refuses_bad_scales(min_scale):
    with pytest.raises(ValueError, match=r"min_scale must be a number in \(0, 1\)"):
        num_filters_for_length(256, min_scale)
