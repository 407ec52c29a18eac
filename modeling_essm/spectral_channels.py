"""The gated spectral channels of the ES-SSM mixer on whole sequences: a forward, and a backward that recomputes.

    out(t) = sum_j a_j(t) * (phi_j * u)(t) M_j        (B, D, T), over the active channels j, chunk by chunk

Forward takes the inputs in the time domain, computes their spectrum and saves what backward needs to recompute
the convolutions (that spectrum, the gate, the projections), as FlashAttention and FlashFFTConv recompute instead of
storing, plus the gated convolutions a_j(t) (phi_j * u)(t) of the first `saved` channels, a number the mixer fits to a
byte cap (`spectral_saved_mb`); backward recomputes the other channels' but no projection GEMM. Both run on blocks of
a few sequences (one at the reference size), each block with its own saved channels. Two costs go away:

- memory: apart from the capped saved channels nothing of size (B, k, D, T) outlives its chunk, so training memory
  stops growing with the budget once the cap is reached; each saved channel spares a third of its FFTs, and the
  GEMMs read its gated convolutions where they are saved (no copy, and no product with the gate again in backward);
- fresh pages: a chunk's features and their gradient live in buffers that every chunk, layer and step reuse, and
  the FFTs run one channel at a time, on inputs and outputs of a few MB that stay in cache and that glibc reuses
  when freed; a plain process that frees and re-allocates tens of MB per chunk instead gets them back from the
  kernel as pages it zeroes again at every allocation. For that reason inference runs the forward too (nothing
  saved).

Forward and backward are custom operators (`torch.library.custom_op`), which torch.compile keeps whole in its graphs.
`modeling_essm.ESSSMSpectralMixer.project_channels` is the same computation in plain autograd (the kept path);
tests check this one against it, against `gradcheck` and against `naive.naive_mixer`.
"""

import math
import re
import threading

import torch


class ChunkWorkspace(threading.local):
    """Flat buffers, one per (name, dtype, device) and per thread, grown to the largest chunk seen and then reused.

    A chunk's intermediates live here only while one forward or backward of `gated_spectral_channels` runs, so
    every mixer of a model (and every model on the thread) can share them.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key, numel = (name, dtype, device), math.prod(shape)
        flat = self.buffers.get(key)
        if flat is None or flat.numel() < numel:
            self.buffers.pop(key, None)  # free the smaller one first: the peak is one buffer, not two
            with torch.inference_mode(False):  # one made under inference mode could not be written in training
                flat = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def clear(self):
        self.buffers.clear()


WORKSPACE = ChunkWorkspace()


def release_workspace():
    """Frees the calling thread's reused chunk buffers (they are made again, at their size, on the next call).

    On CUDA, autograd runs backward on a thread of its own, whose buffers a call from the training loop does not reach.
    """
    WORKSPACE.clear()


def channel_convolution(u_spectrum, channel_spectrum, seq_len: int) -> torch.Tensor:
    """(phi_j * u)(t) of one channel, t < seq_len: (B, D, F) x (F,) -> (B, D, seq_len), a view of the inverse FFT.

    One channel at a time keeps each transform's input and output (a few MB) in cache. The spectra's product goes
    into a reused buffer: allocated afresh, it ran up to 5x slower in a training step (pages the kernel zeroes); the
    FFTs allocate their outputs themselves (given `out=`, they copy into it, which was slower still)."""
    reused = WORKSPACE.get("spectrum", u_spectrum.shape, u_spectrum.dtype, u_spectrum.device)
    spectrum = torch.mul(u_spectrum, channel_spectrum, out=reused)  # (B, D, F)
    return torch.fft.irfft(spectrum, n=2 * (u_spectrum.shape[-1] - 1))[..., :seq_len]


# The operators run on blocks of a few sequences, so that each channel's FFT output stays within this many bytes: one
# sequence of the reference LM (D=256, 1,024 tokens), whose spectra and outputs stay in cache and which glibc reuses
# when freed, and whose chunks of channels and saved convolutions are those of one sequence. A batch of 4 x 1,024
# tokens, run as one block with its chunks and saved channels sized for the whole batch, took 1.2x as long per
# sequence in the operators as one sequence (docs/performance.md).
FFT_BLOCK_BYTES = 2 * 2**20


def sequences_per_block(hidden: int, n_fft: int) -> int:
    """How many sequences the operators take at once: (b, D, n_fft) float32 within FFT_BLOCK_BYTES, one at least."""
    return max(1, FFT_BLOCK_BYTES // (hidden * n_fft * 4))


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


# Named after this module, so that a copy loaded as remote code (trust_remote_code) registers operators of its own.
OPERATOR_PREFIX = "essm::" + re.sub(r"\W", "_", __name__)


def channel_chunks(k: int, chunk: int, saved: int) -> list[tuple[int, int]]:
    """(start, end) of the chunks of at most `chunk` channels over k, none across `saved`: a chunk's GEMMs then read
    its gated convolutions from one block, the saved one or the workspace."""
    return ([(start, min(start + chunk, saved)) for start in range(0, saved, chunk)]
            + [(start, min(start + chunk, k)) for start in range(saved, k, chunk)])


def gated_spectral_channels(u, filter_spectrum, weights, projections, multiplier: float, chunk: int,
                            saved: int = 0) -> torch.Tensor:
    """sum_j a_j(t) (phi_j * u)(t) M_j over k channels, `chunk` at a time: (B, D, T), time last.

    u (B, D, T): the inputs, time last (float32, or float64 for gradcheck);
    filter_spectrum (k, F): rFFT of the scaled filters at an FFT size n = 2 * (F - 1) >= 2T - 1, so that no input
        wraps around onto an output (complex64, or complex128 with float64 inputs; fixed buffers: no gradient);
    weights (B, k, T): the gate, contiguous. Its gradient is read from the gated convolutions divided by the
        weights: exact where they are normal floats, as a softmax gate's are (the mixer's RMS rescale bounds its
        logits' spread by sqrt(2k), so every weight is at least exp(-sqrt(2k)) / k), and 0 where a weight is 0
        (the softmax's input gradient does not depend on it there);
    projections (K, D, D), K >= k: the stored M_j, which the GEMMs scale by `multiplier`
        (ESSSMConfig.spectral_proj_multiplier) instead of materialising the effective ones. Rows past k get a zero
        gradient: the whole parameter, not its slice, spares autograd the slice's backward (a zeroed (K, D, D) copy
        per layer);
    chunk, saved: the channels per GEMM, and the first min(saved, k) channels, whose gated convolutions (b, saved,
        D, T) are kept for backward instead of recomputed there, in each block of b sequences (`sequences_per_block`)
        that the operators take in turn.
    Under autocast the projections' GEMMs run in its dtype and the FFTs and the sum stay in full precision, as in
    `project_channels`; the dtype is read here, where torch.compile sees it, and handed to the operators.
    """
    if filter_spectrum.requires_grad:
        raise ValueError("gated_spectral_channels takes fixed filters: filter_spectrum must not require grad.")
    k, seq_len, n_fft = filter_spectrum.shape[0], u.shape[-1], 2 * (filter_spectrum.shape[-1] - 1)
    if weights.shape[1] != k or projections.shape[0] < k:
        raise ValueError(f"gated_spectral_channels: {k} filters need {k} gate weights per token (got "
                         f"{weights.shape[1]}) and at least {k} projections (got {projections.shape[0]}).")
    if n_fft < 2 * seq_len - 1:
        raise ValueError(f"gated_spectral_channels: {seq_len} steps need filter spectra at an FFT size of at least "
                         f"{2 * seq_len - 1} (2T - 1, else the convolutions wrap around), got {n_fft}.")
    device_type = u.device.type
    autocast = torch.is_autocast_enabled(device_type)
    gemm_dtype = torch.get_autocast_dtype(device_type) if autocast else u.dtype
    if not (torch.is_grad_enabled() and (weights.requires_grad or projections.requires_grad)):
        saved = 0  # the saved channels serve only the gate's and the projections' gradients
    saved = torch.sym_min(saved, k)  # symbolic under torch.compile: budgets share graphs
    block = sequences_per_block(u.shape[1], n_fft)
    outs = [gated_channels(u_block, filter_spectrum, weights_block, projections, multiplier, chunk, saved, gemm_dtype)[0]
            for u_block, weights_block in zip(u.split(block), weights.split(block))]
    return torch.cat(outs) if len(outs) > 1 else outs[0]  # (B, D, T)


@torch.library.custom_op(f"{OPERATOR_PREFIX}_gated_channels", mutates_args=())
def gated_channels(u: torch.Tensor, filter_spectrum: torch.Tensor, weights: torch.Tensor, projections: torch.Tensor,
                   multiplier: float, chunk: int, saved: int,
                   gemm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of `gated_spectral_channels`, its projections' GEMMs in `gemm_dtype`: the output (B, D, T), the
    first `saved` channels' gated convolutions (B, saved, D, T), which backward reads instead of recomputing, and the
    inputs' spectrum (B, D, F), which backward convolves again for the others."""
    batch, hidden, seq_len = u.shape
    n_fft = 2 * (filter_spectrum.shape[-1] - 1)
    # The inputs zero-padded to n_fft in a reused buffer: faster than the rFFT's own padding (n=).
    padded = WORKSPACE.get("padded", (batch, hidden, n_fft), u.dtype, u.device)
    padded[..., :seq_len].copy_(u)
    padded[..., seq_len:].zero_()
    u_spectrum = torch.fft.rfft(padded)  # (B, D, F), shared by every channel
    out = u.new_empty(batch, hidden, seq_len)  # contiguous whatever u's strides; the first chunk's GEMM writes it
    saved_features = u.new_empty(batch, saved, hidden, seq_len)
    for start, end in channel_chunks(filter_spectrum.shape[0], chunk, saved):
        if start < saved:
            features = saved_features[:, start:end]
        else:
            features = WORKSPACE.get("features", (batch, end - start, hidden, seq_len), u.dtype, u.device)
        for j in range(start, end):  # a_j(t) (phi_j * u)(t) from the inverse FFT
            conv = channel_convolution(u_spectrum, filter_spectrum[j], seq_len)  # (B, D, T)
            torch.mul(conv, weights[:, j, None], out=features[:, j - start])
        # M^T @ features, time last (see project_channels for why this orientation).
        mixing = projections[start:end].reshape(-1, hidden).T.to(gemm_dtype)  # (D, c*D)
        lowered = in_dtype(features.flatten(1, 2), gemm_dtype, "lowered")  # (B, c*D, T)
        matmul_into(out, mixing.expand(batch, -1, -1), lowered, multiplier, accumulate=start > 0)
    return out, saved_features, u_spectrum


@gated_channels.register_fake
def _(u, filter_spectrum, weights, projections, multiplier, chunk, saved, gemm_dtype):
    batch, hidden, seq_len = u.shape
    spectrum_dtype = torch.promote_types(u.dtype, torch.complex64)  # complex64, complex128 for float64
    return (u.new_empty(batch, hidden, seq_len), u.new_empty(batch, saved, hidden, seq_len),
            u.new_empty(batch, hidden, filter_spectrum.shape[-1], dtype=spectrum_dtype))


@torch.library.custom_op(f"{OPERATOR_PREFIX}_gated_channels_backward", mutates_args=())
def gated_channels_backward(grad_out: torch.Tensor, u_spectrum: torch.Tensor, filter_spectrum: torch.Tensor,
                            weights: torch.Tensor, projections: torch.Tensor, saved_features: torch.Tensor,
                            multiplier: float, chunk: int, gemm_dtype: torch.dtype, input_grad: bool,
                            gate_grad: bool, projections_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `gated_channels` for u, weights and projections, the gated convolutions past the saved ones
    recomputed from the inputs' spectrum.

    Only the gradients asked for are computed (the others come back empty): a frozen `spectral_proj`, as under LoRA
    on other layers, spares the projections' GEMM, and a frozen gate and projections spare the recomputation.
    """
    batch, hidden, n_freq = u_spectrum.shape
    seq_len, n_fft = grad_out.shape[-1], 2 * (n_freq - 1)
    device, real_dtype = u_spectrum.device, u_spectrum.real.dtype
    saved = saved_features.shape[1]
    grad_out_lowered = grad_out.to(gemm_dtype)  # (B, D, T)
    # The inputs' gradient is the sum of the convolutions' adjoints, the correlations with the filters: summed in the
    # frequency domain (each rFFT times its filter's conjugate spectrum), then one inverse FFT.
    grad_spectrum = torch.zeros_like(u_spectrum) if input_grad else None
    grad_weights = torch.empty(weights.shape if gate_grad else 0, dtype=real_dtype, device=device)
    grad_projections = torch.empty(projections.shape if projections_grad else 0, dtype=real_dtype, device=device)
    grad_projections[filter_spectrum.shape[0]:].zero_()  # the channels above the budget
    # conj_physical, not conj: a lazy conjugate bit is lost when compiled autograd runs this operator in a graph.
    conjugate_filters = filter_spectrum.conj_physical()  # (k, F)
    # The rFFT's input, zero-padded to n_fft once: each channel then writes only its first seq_len samples.
    padded = WORKSPACE.get("padded", (batch, hidden, n_fft), real_dtype, device)
    padded[..., seq_len:].zero_()
    for start, end in channel_chunks(filter_spectrum.shape[0], chunk, saved):
        shape = (batch, end - start, hidden, seq_len)
        # 1. d out / d features = M @ grad_out.
        grad_features = WORKSPACE.get("grad_features", shape, real_dtype, device)
        if input_grad or gate_grad:
            mixing = projections[start:end].reshape(-1, hidden).to(gemm_dtype)  # (c*D, D)
            matmul_into(grad_features.flatten(1, 2), mixing.expand(batch, -1, -1), grad_out_lowered, multiplier)
        # 2. The chunk's gated convolutions (features), saved or recomputed, give the gate's gradient times the gate
        # (their product with grad_features summed over D; divided by the gate below).
        features = saved_features[:, start:end] if start < saved else WORKSPACE.get("features", shape, real_dtype,
                                                                                    device)
        gate_terms = WORKSPACE.get("gate_terms", shape[:1] + shape[2:], real_dtype, device)  # (B, D, T)
        for j in range(start, end) if gate_grad or projections_grad else ():
            if j >= saved:
                conv = channel_convolution(u_spectrum, filter_spectrum[j], seq_len)  # (B, D, T)
                torch.mul(conv, weights[:, j, None], out=features[:, j - start])
            if gate_grad:
                terms = torch.mul(features[:, j - start], grad_features[:, j - start], out=gate_terms)
                torch.sum(terms, dim=1, out=grad_weights[:, j])
        # 3. The projections' gradient: features @ grad_out^T, summed over the batch.
        if projections_grad:
            lowered = in_dtype(features.flatten(1, 2), gemm_dtype, "lowered")  # (B, c*D, T)
            grad_mixing = grad_projections[start:end].view(-1, hidden)  # (c*D, D)
            for b in range(batch):
                matmul_into(grad_mixing, lowered[b], grad_out_lowered[b].T, multiplier, accumulate=b > 0)
        # 4. The inputs' spectral gradient: d out / d conv = a_j * grad_features, correlated with phi_j.
        for j in range(start, end) if input_grad else ():
            torch.mul(grad_features[:, j - start], weights[:, j, None], out=padded[..., :seq_len])
            grad_spectrum.addcmul_(torch.fft.rfft(padded), conjugate_filters[j])  # (B, D, F)
    if gate_grad:  # a weight of 0 gated its convolution to 0: its gradient reads 0 (see gated_spectral_channels)
        grad_weights.div_(weights).masked_fill_(weights == 0, 0.0)
    # The outputs t < T of the correlations: no later input wraps around onto them (n_fft >= 2T - 1).
    grad_u = (torch.fft.irfft(grad_spectrum, n=n_fft)[..., :seq_len].contiguous() if input_grad
              else grad_out.new_empty(0, dtype=real_dtype))
    return grad_u, grad_weights.to(weights.dtype), grad_projections.to(projections.dtype)


@gated_channels_backward.register_fake
def _(grad_out, u_spectrum, filter_spectrum, weights, projections, saved_features, multiplier, chunk,
      gemm_dtype, input_grad, gate_grad, projections_grad):
    u_shape = (*u_spectrum.shape[:2], grad_out.shape[-1])
    wanted = ((u_shape, u_spectrum.real.dtype, input_grad), (weights.shape, weights.dtype, gate_grad),
              (projections.shape, projections.dtype, projections_grad))
    # Contiguous, as the real ones.
    return tuple(grad_out.new_empty(shape if needed else 0, dtype=dtype) for shape, dtype, needed in wanted)


def save_for_recomputation(ctx, inputs, output):
    _, filter_spectrum, weights, projections, multiplier, chunk, _, gemm_dtype = inputs
    _, saved_features, u_spectrum = output
    ctx.mark_non_differentiable(saved_features, u_spectrum)
    ctx.set_materialize_grads(False)  # else autograd would fill zero gradients the size of those two
    ctx.save_for_backward(u_spectrum, filter_spectrum, weights, projections, saved_features)
    ctx.settings = multiplier, chunk, gemm_dtype


def recomputing_backward(ctx, grad_out, *non_differentiable):  # the saved features' and spectrum's: never set
    if grad_out is None:  # an undefined gradient (not materialised, see save_for_recomputation): nothing flows back
        return (None,) * 8
    input_grad, _, gate_grad, projections_grad = ctx.needs_input_grad[:4]
    grads = gated_channels_backward(grad_out, *ctx.saved_tensors, *ctx.settings, input_grad, gate_grad,
                                    projections_grad)
    grad_u, grad_weights, grad_projections = (grad if needed else None for grad, needed in
                                              zip(grads, (input_grad, gate_grad, projections_grad)))
    return grad_u, None, grad_weights, grad_projections, None, None, None, None


gated_channels.register_autograd(recomputing_backward, setup_context=save_for_recomputation)
