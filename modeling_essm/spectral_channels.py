"""The gated spectral channels of the ES-SSM mixer as one autograd Function, for training and inference.

    out(t) = sum_j a_j(t) * (phi_j * u)(t) M_j        (B, D, T), over the active channels j, chunk by chunk

Each chunk's convolutions are built in buffers that every chunk, layer and step reuse, and backward recomputes
them from what forward saved (the input spectrum, the gate, the projections) instead of keeping them, as
FlashAttention and FlashFFTConv recompute instead of storing. Two costs go away at once:

- memory: nothing of size (B, k, D, T) outlives its chunk, so training memory does not grow with the budget;
- fresh pages: a plain process that frees and re-allocates tens of MB per chunk gets them back from the kernel
  zeroed at every allocation (glibc's malloc returns large blocks to the system); reused buffers are faulted in
  once.

`modeling_essm.ESSSMSpectralMixer.project_channels` is the same computation in plain autograd (kept for
backward, and traced by torch.compile); tests check this one against it and against `naive.naive_mixer`.
"""

import threading

import torch
from torch.autograd.function import once_differentiable


class ChunkWorkspace(threading.local):
    """Flat buffers, one per (name, dtype, device) and per thread, grown to the largest chunk seen and then reused.

    A chunk's intermediates live here only while one forward or backward of `GatedSpectralChannels` runs, so every
    mixer of a model (and every model on the thread) can share them.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        numel = 1
        for size in shape:
            numel *= size
        flat = self.buffers.get(key)
        if flat is None or flat.numel() < numel:
            self.buffers.pop(key, None)  # free the smaller one first: the peak is one buffer, not two
            flat = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def clear(self):
        self.buffers.clear()


WORKSPACE = ChunkWorkspace()


def release_workspace():
    """Frees the calling thread's reused chunk buffers (they are made again, at their size, on the next call)."""
    WORKSPACE.clear()


def chunk_convolutions(u_spectrum, filter_spectrum, seq_len: int) -> torch.Tensor:
    """(phi_j * u)(t) for the chunk's c channels, in the workspace: (B, D, F) x (c, F) -> (B, c, D, n_fft) real,
    of which the first seq_len outputs are the causal convolutions."""
    batch, hidden, n_freq = u_spectrum.shape
    channels, n_fft = filter_spectrum.shape[0], 2 * (n_freq - 1)
    product = WORKSPACE.get("spectrum", (batch, channels, hidden, n_freq), u_spectrum.dtype, u_spectrum.device)
    torch.mul(u_spectrum.unsqueeze(1), filter_spectrum[:, None], out=product)
    conv = WORKSPACE.get("conv", (batch, channels, hidden, n_fft), u_spectrum.real.dtype, u_spectrum.device)
    return torch.fft.irfft(product, n=n_fft, out=conv)


def in_dtype(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """x as `dtype` (the GEMMs' dtype under autocast), copied into the workspace when it differs."""
    if x.dtype == dtype:
        return x
    return WORKSPACE.get(name, x.shape, dtype, x.device).copy_(x)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, accumulate: bool = False):
    """out = alpha * a @ b, or out += alpha * a @ b, in place: a and b in the GEMMs' dtype, out in the sum's."""
    if a.dtype != out.dtype:  # autocast: the GEMM in its dtype, the sum in full precision
        product = torch.matmul(a, b)
        return out.add_(product, alpha=alpha) if accumulate else torch.mul(product, alpha, out=out)
    gemm = out.addmm_ if out.dim() == 2 else out.baddbmm_
    return gemm(a, b, beta=1 if accumulate else 0, alpha=alpha)


class GatedSpectralChannels(torch.autograd.Function):
    """sum_j a_j(t) (phi_j * u)(t) M_j over k channels, `chunk` at a time: (B, D, T), time last.

    u_spectrum (B, D, F): rFFT of the inputs, time last, at the FFT size 2 * (F - 1) >= 2T (complex64, or
        complex128 for gradcheck: the outputs are real of the same precision);
    filter_spectrum (k, F): rFFT of the scaled filters at the same size (fixed buffers: no gradient);
    weights (B, k, T): the gate, contiguous; projections (k, D, D): the stored M_j, which the GEMMs scale by
        `multiplier` (ESSSMConfig.spectral_proj_multiplier) instead of materialising the effective ones.
    Under autocast the projections' GEMMs run in its dtype and the FFTs and the sum stay in full precision, as in
    `project_channels`.
    """

    @staticmethod
    def forward(ctx, u_spectrum, filter_spectrum, weights, projections, multiplier: float, seq_len: int, chunk: int):
        if filter_spectrum.requires_grad:
            raise ValueError("GatedSpectralChannels takes fixed filters: filter_spectrum must not require grad.")
        batch, hidden = u_spectrum.shape[:2]
        device, real_dtype = u_spectrum.device, u_spectrum.real.dtype
        autocast = torch.is_autocast_enabled(device.type)
        gemm_dtype = torch.get_autocast_dtype(device.type) if autocast else real_dtype
        out = torch.zeros(batch, hidden, seq_len, dtype=real_dtype, device=device)
        for start in range(0, filter_spectrum.shape[0], chunk):
            end = min(start + chunk, filter_spectrum.shape[0])
            conv = chunk_convolutions(u_spectrum, filter_spectrum[start:end], seq_len)[..., :seq_len]  # (B, c, D, T)
            features = conv.mul_(weights[:, start:end, None]).flatten(1, 2)  # (B, c*D, T)
            # M^T @ features, time last (see project_channels for why this orientation).
            mixing = projections[start:end].reshape(-1, hidden).T.to(gemm_dtype)  # (D, c*D)
            lowered = in_dtype(features, gemm_dtype, "features")
            matmul_into(out, mixing.expand(batch, -1, -1), lowered, multiplier, accumulate=True)
        ctx.save_for_backward(u_spectrum, filter_spectrum, weights, projections)
        ctx.multiplier, ctx.chunk, ctx.gemm_dtype = multiplier, chunk, gemm_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u_spectrum, filter_spectrum, weights, projections = ctx.saved_tensors
        batch, hidden, n_freq = u_spectrum.shape
        seq_len, n_fft, dtype, multiplier = grad_out.shape[-1], 2 * (n_freq - 1), ctx.gemm_dtype, ctx.multiplier
        device, real_dtype = u_spectrum.device, u_spectrum.real.dtype
        grad_out_lowered = grad_out.to(dtype)  # (B, D, T)
        grad_u_spectrum = torch.zeros_like(u_spectrum)
        grad_weights = torch.empty(weights.shape, dtype=real_dtype, device=device)
        grad_projections = torch.empty(projections.shape, dtype=real_dtype, device=device)
        # irfft's adjoint: rFFT times 2/n, and 1/n at the two frequencies that appear once (0 and n/2).
        adjoint_scale = torch.full((n_freq,), 2.0 / n_fft, dtype=real_dtype, device=device)
        adjoint_scale[[0, -1]] = 1.0 / n_fft
        for start in range(0, filter_spectrum.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, filter_spectrum.shape[0])
            channels = end - start
            # 1. The chunk's convolutions, recomputed.
            conv = chunk_convolutions(u_spectrum, filter_spectrum[start:end], seq_len)[..., :seq_len]  # (B, c, D, T)
            # 2. d out / d features = M @ grad_out, written into a zero-padded buffer for the FFT of step 5.
            padded = WORKSPACE.get("padded", (batch, channels, hidden, n_fft), real_dtype, device)
            padded[..., seq_len:].zero_()
            grad_features = padded[..., :seq_len]  # (B, c, D, T)
            mixing = projections[start:end].reshape(-1, hidden).to(dtype)  # (c*D, D)
            matmul_into(grad_features.flatten(1, 2), mixing.expand(batch, -1, -1), grad_out_lowered, multiplier)
            # 3. The gate's gradient: sum over D of grad_features * conv.
            product = WORKSPACE.get("product", conv.shape, real_dtype, device)
            torch.sum(torch.mul(grad_features, conv, out=product), dim=2, out=grad_weights[:, start:end])
            # 4. The projections' gradient: features @ grad_out^T, summed over the batch.
            features = conv.mul_(weights[:, start:end, None]).flatten(1, 2)  # (B, c*D, T)
            lowered = in_dtype(features, dtype, "features")
            grad_mixing = grad_projections[start:end].view(-1, hidden)  # (c*D, D)
            for b in range(batch):
                matmul_into(grad_mixing, lowered[b], grad_out_lowered[b].T, multiplier, accumulate=b > 0)
            # 5. The input spectrum's gradient: the convolutions' adjoint, summed over the chunk's channels.
            grad_features.mul_(weights[:, start:end, None])  # d out / d conv
            spectrum = WORKSPACE.get("spectrum", (batch, channels, hidden, n_freq), u_spectrum.dtype, device)
            torch.fft.rfft(padded, out=spectrum)
            spectrum.mul_((filter_spectrum[start:end].conj() * adjoint_scale)[:, None])
            for channel in range(channels):
                grad_u_spectrum += spectrum[:, channel]
        grad_weights, grad_projections = grad_weights.to(weights.dtype), grad_projections.to(projections.dtype)
        return grad_u_spectrum, None, grad_weights, grad_projections, None, None, None


def gated_spectral_channels(u_spectrum, filter_spectrum, weights, projections, multiplier: float, seq_len: int,
                            chunk: int) -> torch.Tensor:
    """`GatedSpectralChannels` applied: see its docstring for the arguments."""
    return GatedSpectralChannels.apply(u_spectrum, filter_spectrum, weights, projections, multiplier, seq_len, chunk)
