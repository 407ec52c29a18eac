"""The ES-SSM spectral mixer written out as its equation: the reference every fast path is tested against.

    y(t) = sum_{j<=k} a_j(t) * (sigma_j^(1/4) phi_j * u)(t) M_j  +  u(t) W_skip  +  (w * u)(t)

Direct causal sums in float64: no FFT, no chunking, no cache, O(T^2 k D) time. Its numbered steps are the steps
of `ESSSMSpectralMixer.whole_sequence` (modeling_essm.py), which computes the same thing by FFT.
"""

import math

import torch
import torch.nn.functional as F


def naive_mixer(mixer, u: torch.Tensor, filters: torch.Tensor, eigenvalues: torch.Tensor, spectral_budget: int):
    """Mixer outputs (B, T, D), float64, of an `ESSSMSpectralMixer` for inputs u (B, T, D) at a budget.

    filters (L, K) and eigenvalues (K,) are the model's spectral basis (`model.model.spectral_basis`).
    """
    batch, seq_len, hidden = u.shape
    k = spectral_budget
    u = u.double()

    # 1. The gate: logits of the first k channels, rescaled to unit RMS, softmaxed over those k only.
    logits = F.gelu(u @ mixer.gate_in.weight.double().T + mixer.gate_in.bias.double())
    logits = (logits @ mixer.gate_out.weight.double().T + mixer.gate_out.bias.double())[..., :k]
    logits = logits * math.sqrt(k) / logits.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    gate = torch.softmax(logits, dim=-1)  # (B, T, k)

    # 2. Each active channel j: the causal convolution of u with sigma_j^(1/4) phi_j, lag 0 included,
    # 3. weighted by the gate and projected by the effective M_j (the stored M_j times the multiplier).
    y = torch.zeros(batch, seq_len, hidden, dtype=torch.float64)
    for j in range(k):
        taps = filters[:seq_len, j].double() * eigenvalues[j].double().clamp_min(0) ** 0.25  # (T,)
        conv = torch.zeros_like(u)
        for t in range(seq_len):
            conv[:, t] = torch.einsum("s,bsd->bd", taps[: t + 1].flip(0), u[:, : t + 1])
        projection = mixer.spectral_proj_multiplier * mixer.spectral_proj[j].double()
        y = y + gate[..., j : j + 1] * (conv @ projection)

    # 4. The skip matrix and the depthwise local convolution over the last local_conv_size inputs.
    y = y + u @ mixer.skip_proj.weight.double().T
    if mixer.local_conv is not None:
        weight, size = mixer.local_conv.weight.double()[:, 0], mixer.local_conv_size  # (D, size), tap size-1 is lag 0
        y = y + mixer.local_conv.bias.double()
        for lag in range(min(size, seq_len)):
            y[:, lag:] = y[:, lag:] + u[:, : seq_len - lag] * weight[:, size - 1 - lag]
    return y
