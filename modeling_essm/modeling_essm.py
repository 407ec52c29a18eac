"""Elastic Spectral State Space Models (ES-SSM, arXiv 2601.22488) for Hugging Face transformers.

Each block convolves its input with fixed spectral filters (the top eigenvectors of a Hankel
matrix), mixes the K filtered copies with learned D x D projections through a per-token gate,
and adds a learned skip and a short local convolution. A forward pass at spectral budget k uses only the first k channels:
the gate renormalises over them and the others are never computed, so one trained model runs
at any k in [min_spectral_budget, K].
"""

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .cache_essm import ESSSMCache
from .configuration_essm import ESSSMConfig, check_spectral_budget
from .spectral_channels import gated_spectral_channels, sequences_per_block
from .spectral_filters import spectral_filters
from .speculative_essm import DEFAULT_DRAFT_TOKENS, ESSSMDraftCandidateGenerator


def resolve_spectral_budget(spectral_budget, config: ESSSMConfig) -> int | list[int]:
    """The budget of one call: `None` means the model's default (`config.spectral_budget`, itself None for the
    full K); anything else an integer in range or one per layer (see `check_spectral_budget`). A per-layer budget
    comes back as a list."""
    if spectral_budget is None:
        if config.spectral_budget is None:
            return config.num_spectral_filters
        return check_spectral_budget(config.spectral_budget, config, "config.spectral_budget (the model's default budget)")
    if isinstance(spectral_budget, torch.Tensor):  # checked as the Python numbers it holds
        spectral_budget = spectral_budget.item() if spectral_budget.numel() == 1 else spectral_budget.tolist()
    return check_spectral_budget(spectral_budget, config)


def resolve_draft_budget(draft_budget, spectral_budget, config: ESSSMConfig) -> int:
    """The budget self-speculative decoding drafts at: an integer below the verifying budget (its largest layer
    budget when that is per layer)."""
    low, top = config.min_spectral_budget, max(config.layer_budgets(spectral_budget))
    if (isinstance(draft_budget, bool) or not isinstance(draft_budget, numbers.Integral)
            or not low <= draft_budget < top):
        raise ValueError(f"draft_budget must be an integer in [{low}, {top - 1}] (min_spectral_budget to "
                         f"spectral_budget - 1, the budget it drafts for, or its largest layer budget - 1); "
                         f"got {draft_budget!r}.")
    return int(draft_budget)


# glibc serves blocks of 32 MB and more with fresh pages from mmap at every allocation (its largest dynamic mmap
# threshold); kept chunks keep their temporaries below it, with room for the allocator's own headers.
REUSED_BYTES = 30 * 2**20
# Recomputed chunks are sized like the others, by their convolution output (their FFTs run one channel at a time):
# at 4,096 tokens a layer's forward + backward took 1.41 s with 16 MB chunks, 1.65 s with 4 MB ones.
RECOMPUTED_CHUNK_BYTES = 16 * 2**20


def fft_length(seq_len: int) -> int:
    """An even FFT size >= 2 * seq_len (no circular wrap-around) whose factors are only 2, 3 and 5 (fast)."""
    n = seq_len
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return 2 * n
        n += 1


def circular_convolutions(input_spectrum: torch.Tensor, filter_spectrum: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Every input channel convolved with every filter, from their rFFTs: (B, D, F) x (c, F) -> (B, c, D, n_fft).

    The one convolution of the package (the whole-sequence mixer and a cache's chunk of new tokens); it is the causal
    convolution at every output that no input wraps around onto, which the callers' `n_fft` ensures.
    """
    return torch.fft.irfft(input_spectrum.unsqueeze(1) * filter_spectrum[:, None], n=n_fft)


class ESSSMSpectralBasis(nn.Module):
    """The fixed filters phi_1..phi_K (L, K) and their Hankel eigenvalues sigma_1..sigma_K.

    They are persistent buffers: a checkpoint carries them and loading never recomputes them, since a
    recomputation may flip signs or change the numerically arbitrary tail vectors of a trained model.
    """

    def __init__(self, config: ESSSMConfig):
        super().__init__()
        # Filled by `_init_weights` for a new model, by the checkpoint when loading.
        # float32 whatever the default dtype, as `_keep_in_fp32_modules_strict` promises transformers.
        self.register_buffer("eigenvalues", torch.empty(config.num_spectral_filters, dtype=torch.float32))  # (K,)
        self.register_buffer("filters", torch.empty(config.max_position_embeddings, config.num_spectral_filters,
                                                    dtype=torch.float32))  # (L, K)

    def scaled_filters(self, length: int, spectral_budget: int) -> torch.Tensor:
        """The first `length` taps of the first `spectral_budget` filters, times sigma^(1/4): (length, k) float32."""
        # Tail eigenvalues below float64 precision can come out as tiny negatives: those channels carry nothing.
        scale = self.eigenvalues[:spectral_budget].float().clamp_min(0.0).pow(0.25)
        return self.filters[:length, :spectral_budget].float() * scale

    def filter_spectrum(self, seq_len: int, spectral_budget: int, n_fft: int | None = None) -> torch.Tensor:
        """rFFT of the scaled filters for sequences of up to `seq_len`: (k, n_fft // 2 + 1) complex64; n_fft defaults
        to `fft_length(seq_len)`, the size that makes the whole sequence's convolution causal."""
        return torch.fft.rfft(self.scaled_filters(seq_len, spectral_budget).T, n=n_fft or fft_length(seq_len))

    def causal_convolution(self, inputs: torch.Tensor, start: int, spectral_budget: int, chunk_size: int):
        """Outputs start..T-1 of the causal convolutions of inputs (B, T, D) with the scaled filters, by one FFT.

        Returns (B, T - start, k, D) float32: a chunk of new tokens that continues a cached history needs only these.
        """
        batch, seq_len, hidden = inputs.shape
        # A circular convolution is the causal one on these outputs as long as no input wraps around onto them.
        n_fft = fft_length(math.ceil((2 * seq_len - 1 - start) / 2))
        # Time is the last axis during the FFTs, as in forward: they and the products are fastest along it.
        input_spectrum = torch.fft.rfft(inputs.float().transpose(1, 2), n=n_fft)  # (B, D, F)
        filter_spectrum = self.filter_spectrum(seq_len, spectral_budget, n_fft)  # (k, F)
        out = inputs.new_empty(batch, seq_len - start, spectral_budget, hidden, dtype=torch.float32)
        for first in range(0, spectral_budget, chunk_size):  # bounds the (B, chunk, D, n_fft) intermediate
            last = min(first + chunk_size, spectral_budget)
            conv = circular_convolutions(input_spectrum, filter_spectrum[first:last], n_fft)  # (B, c, D, n_fft)
            out[:, :, first:last] = conv[..., start:seq_len].permute(0, 3, 1, 2)
        return out


class ESSSMSpectralMixer(nn.Module):
    """The sequence mixer of one block: the ES-SSM paper's spectral mixer plus a local convolution.

        y(t) = sum_{j<=k} a_j(t) * (sigma_j^(1/4) phi_j * u)(t) M_j  +  u(t) W_skip  +  (w * u)(t)

    where w * u is depthwise and causal over the last `local_conv_size` inputs (0 drops it: the paper's mixer).

    gate_in, gate_out: the gate MLP D -> gate_hidden_size -> K, whose logits are cut to the first k,
        rescaled to unit RMS and softmaxed over those k only (the same rule at every budget);
    spectral_proj: the layer's K learned D x D matrices, stacked (K, D, D) (K_l of a model sliced per layer,
        `config.num_spectral_filters_per_layer[layer_idx]`); the mixer uses them times
        `spectral_proj_multiplier` (see ESSSMConfig: it makes the spectral path learn at a plain layer's pace);
    skip_proj: the learned D x D skip matrix W_skip (the paper writes it D, which here is the width).
    local_conv: a depthwise causal convolution over the last `local_conv_size` inputs, budget independent
        (absent when local_conv_size is 0; see ESSSMConfig).
    Only the active channels are convolved and projected; under autocast the FFTs and the gate
    softmax stay in float32.
    """

    def __init__(self, config: ESSSMConfig, layer_idx: int = 0):
        super().__init__()
        hidden, num_filters = config.hidden_size, config.layer_spectral_filters[layer_idx]
        self.gate_in = nn.Linear(hidden, config.gate_hidden_size)
        self.gate_out = nn.Linear(config.gate_hidden_size, num_filters)
        self.spectral_proj = nn.Parameter(torch.empty(num_filters, hidden, hidden))
        self.skip_proj = nn.Linear(hidden, hidden, bias=False)
        self.local_conv_size = config.local_conv_size
        # Padded by hand in `local_mixing`, so that a cached step can prepend the inputs before it instead of zeros.
        self.local_conv = nn.Conv1d(hidden, hidden, config.local_conv_size, groups=hidden) if config.local_conv_size else None
        self.spectral_proj_multiplier = config.spectral_proj_multiplier
        self.chunk_size = config.spectral_chunk_size
        self.chunk_bytes = config.spectral_chunk_mb * 2**20
        self.recompute = config.spectral_recompute
        self.saved_mb = config.spectral_saved_mb

    def gate(self, u: torch.Tensor, spectral_budget: int) -> torch.Tensor:
        """Per-token mixing weights over the active channels: (B, T, D) -> (B, T, k), float32, rows sum to 1."""
        # Calling gate_out whole (K logits, a tiny cost) keeps it an ordinary layer that adapters such as
        # LoRA can wrap; the logits above the budget are dropped, so their rows get exactly zero gradient.
        logits = self.gate_out(F.gelu(self.gate_in(u)))[..., :spectral_budget].float()
        rms_rescale = math.sqrt(spectral_budget) / logits.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return torch.softmax(logits * rms_rescale, dim=-1)

    def projections(self, first: int, last: int) -> torch.Tensor:
        """The effective M_first..M_(last-1): (last - first, D, D)."""
        return self.spectral_proj_multiplier * self.spectral_proj[first:last]

    def forward(self, u: torch.Tensor, filter_spectrum: torch.Tensor | None, spectral_budget: int, cache_layer=None,
                spectral_basis: ESSSMSpectralBasis | None = None) -> torch.Tensor:
        """Mixer outputs (B, T, D) for inputs u (B, T, D); the one entry point, so that adapters wrapping the mixer
        (peft's `target_parameters`) see every path.

        Without a cache, or with an empty one, the whole sequence at once from `filter_spectrum` (see
        `ESSSMSpectralBasis.filter_spectrum`), recorded in `cache_layer` when given; a cache with a history is
        continued by `step`, which convolves through `spectral_basis` instead.
        """
        if cache_layer is not None and cache_layer.get_seq_length() > 0:
            return self.step(u, cache_layer, spectral_basis, spectral_budget)
        y = self.whole_sequence(u, filter_spectrum, spectral_budget)
        if cache_layer is not None:
            cache_layer.append(u)
        return y

    def whole_sequence(self, u: torch.Tensor, filter_spectrum: torch.Tensor, spectral_budget: int) -> torch.Tensor:
        """The mixer on a whole sequence by FFT; steps numbered as in its reference, `naive.naive_mixer`."""
        seq_len = u.shape[1]
        n_fft = 2 * (filter_spectrum.shape[-1] - 1)
        # 1. The gate over the active channels.
        # Contiguous with time last, as every product with the convolutions reads it (9x faster than strided).
        weights = self.gate(u, spectral_budget).transpose(1, 2).contiguous()  # (B, k, T)
        # 2.-3. The channels' causal convolutions by one shared FFT of u, gated and projected chunk by chunk.
        # Time is kept as the last, contiguous axis: FFTs and the broadcast products are fastest along it (the rFFT of
        # a strided input, and above all its backward, ran slower: 3.9 vs 3.1 ms at D=256, 1,024 tokens).
        u_channels = u.float().transpose(1, 2).contiguous()  # (B, D, T)
        filter_spectrum = filter_spectrum[:spectral_budget]
        if torch.is_grad_enabled() and not self.recompute:
            u_spectrum = torch.fft.rfft(u_channels, n=n_fft)  # (B, D, F), shared by every channel
            spectral = self.autograd_channels(u_spectrum, filter_spectrum, weights, seq_len)
        else:
            # Inference, and training that recomputes the convolutions in backward (but the first channels', saved
            # within spectral_saved_mb): one channel's FFTs at a time, in reused buffers (spectral_channels.py).
            # Chunks and saved channels are those of one block of sequences, the operators' unit of work.
            block = min(u.shape[0], sequences_per_block(u.shape[2], n_fft))
            max_bytes = min(self.chunk_bytes, RECOMPUTED_CHUNK_BYTES)
            chunk = self.channels_per_chunk(block, u.shape[2], n_fft, max_bytes)
            # In MB, not bytes: any finite cap stays finite.
            saved = int(self.saved_mb // (block * u.shape[2] * seq_len * 4 / 2**20))  # float32 (b, D, T) each
            spectral = gated_spectral_channels(u_channels, filter_spectrum, weights, self.spectral_proj,
                                               self.spectral_proj_multiplier, chunk, saved)
        # 4. Plus the skip and local paths.
        return self.combine(u, spectral.transpose(1, 2))  # (B, T, D)

    def combine(self, u: torch.Tensor, spectral: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The mixer output: the gated spectral part (B, n, D) plus the skip and local paths of u (B, n, D)."""
        y = self.skip_proj(u) + spectral
        if self.local_conv is not None:
            y = y + self.local_mixing(u, previous)
        return y.to(u.dtype)

    def local_mixing(self, u: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise causal convolution of u (B, n, D) -> (B, n, D).

        previous: the inputs just before u (B, <= local_conv_size - 1, D), from the cache; zeros stand in for
        those that do not exist (the start of the sequence).
        """
        window = u if previous is None else torch.cat([previous.to(u.dtype), u], dim=1)
        missing = self.local_conv_size - 1 - (window.shape[1] - u.shape[1])
        window = F.pad(window.transpose(1, 2), (missing, 0))  # (B, D, n + local_conv_size - 1)
        return self.local_conv(window).transpose(1, 2)  # (B, n, D)

    def channels_per_chunk(self, batch: int, hidden: int, n_fft: int, max_bytes: float) -> int:
        """At most `chunk_size` channels, and within `max_bytes` of convolution output."""
        bytes_per_channel = batch * hidden * n_fft * 4  # the (B, 1, D, n_fft) float32 inverse FFT
        return max(1, min(self.chunk_size, int(max_bytes // bytes_per_channel)))

    def autograd_channels(self, u_spectrum, filter_spectrum, weights, seq_len: int) -> torch.Tensor:
        """The gated channels in plain autograd, for training that keeps the convolutions for backward
        (`spectral_recompute=False`), compiled or not: (B, D, T) float32.

        Each chunk's temporaries stay under glibc's largest mmap threshold, so that freed ones are reused instead of
        coming back as fresh pages the kernel zeroes (docs/performance.md). torch.compile would build a graph per
        number of chunks (more budgets than its recompilation limit), so compiled code runs one chunk.
        """
        batch, hidden, n_freq = u_spectrum.shape
        spectral_budget, n_fft = filter_spectrum.shape[0], 2 * (n_freq - 1)
        if torch.compiler.is_compiling():
            chunk = spectral_budget
        else:
            chunk = self.channels_per_chunk(batch, hidden, n_fft, min(self.chunk_bytes, REUSED_BYTES))
        # Chunks are summed in float32 even when autocast runs their GEMMs in bf16.
        spectral = u_spectrum.new_zeros(batch, hidden, seq_len, dtype=torch.float32)  # (B, D, T)
        # A while loop, not range(0, spectral_budget, chunk): torch.compile then guards on the number of
        # chunks instead of the exact budget, so all budgets share at most K / chunk_size graphs.
        start = 0
        while start < spectral_budget:
            end = min(start + chunk, spectral_budget)
            spectral = spectral + self.project_channels(u_spectrum, filter_spectrum[start:end], weights[:, start:end],
                                                        self.projections(start, end), seq_len)
            start = end
        return spectral

    @staticmethod
    def project_channels(u_spectrum, filter_spectrum, weights, projections, seq_len: int) -> torch.Tensor:
        """sum_j a_j(t) (phi_j * u)(t) M_j over a chunk of c channels: (B, D, F) spectra -> (B, D, T), time last.

        A function of its own so that a chunk's (B, c, D, 2T) intermediates are freed before the next is built.
        """
        batch, hidden, n_freq = u_spectrum.shape
        conv = circular_convolutions(u_spectrum, filter_spectrum, 2 * (n_freq - 1))[..., :seq_len]  # (B, c, D, T)
        features = (conv * weights[:, :, None]).reshape(batch, -1, seq_len)  # (B, c*D, T)
        # M^T @ features rather than features^T @ M: a time-major operand would be a transposed one, which
        # CPU bf16 GEMMs (autocast) run at a quarter of their speed; fp32 runs alike either way.
        return projections.reshape(-1, hidden).T.to(features.dtype) @ features  # (B, D, T)

    def step(self, u: torch.Tensor, cache_layer, spectral_basis: ESSSMSpectralBasis, spectral_budget: int):
        """Outputs (B, n, D) at the positions u (B, n, D) adds to the history in `cache_layer`; n = 1 when decoding."""
        previous = cache_layer.latest_inputs(self.local_conv_size - 1)  # read before convolve appends u
        return self.mix(u, cache_layer.convolve(u, spectral_basis, spectral_budget), spectral_budget, previous)

    def mix(self, u: torch.Tensor, conv: torch.Tensor, spectral_budget: int, previous: torch.Tensor | None = None):
        """Gate and project the active channels' convolutions: u (B, n, D), conv (B, n, k, D) -> (B, n, D).

        previous: the inputs just before u, for the local convolution (see `local_mixing`).
        """
        batch, seq_len, hidden = u.shape
        features = (conv * self.gate(u, spectral_budget)[..., None]).reshape(batch, seq_len, -1)  # (B, n, k*D)
        spectral = features @ self.projections(0, spectral_budget).reshape(-1, hidden).to(features.dtype)  # (B, n, D)
        return self.combine(u, spectral, previous)


class ESSSMFeedForward(nn.Module):
    def __init__(self, config: ESSSMConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.dropout(F.gelu(self.fc_in(x))))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.drop_prob)
        return x * keep / (1.0 - self.drop_prob)


class ESSSMBlock(GradientCheckpointingLayer):
    """x = x + DropPath(Dropout(Mixer(LN(x)))), then x = x + DropPath(FFN(LN(x))) when the FFN is enabled."""

    def __init__(self, config: ESSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        drop_path = config.drop_path_rate * layer_idx / max(1, config.num_hidden_layers - 1)
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = ESSSMSpectralMixer(config, layer_idx)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.drop_path = DropPath(drop_path)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.intermediate_size else None
        self.ffn = ESSSMFeedForward(config) if config.intermediate_size else None

    def forward(self, hidden_states, filter_spectrum, spectral_budget: int, padding_mask=None, cache=None,
                spectral_basis=None):
        """filter_spectrum covers at least this layer's `spectral_budget` channels; the mixer reads its first ones."""
        u = self.mixer_norm(hidden_states)
        if padding_mask is not None:
            u = u * padding_mask  # padded positions must not leak into later positions through the convolution
        cache_layer = cache.layers[self.layer_idx] if cache is not None else None
        mixed = self.mixer(u, filter_spectrum, spectral_budget, cache_layer=cache_layer, spectral_basis=spectral_basis)
        hidden_states = hidden_states + self.drop_path(self.dropout(mixed))
        if self.ffn is not None:
            hidden_states = hidden_states + self.drop_path(self.ffn(self.ffn_norm(hidden_states)))
        return hidden_states


class ESSSMPreTrainedModel(PreTrainedModel):
    config_class = ESSSMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ESSSMBlock"]
    # Filters and eigenvalues (sigma^(1/4) spans 1e-5..1) stay in float32. The M_j follow `dtype=`: in bf16 they
    # changed a trained byte LM's bits per byte by at most 0.0003 at budgets 2, 4 and K (docs/reliability.md).
    _keep_in_fp32_modules_strict = ["spectral_basis"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, ESSSMSpectralMixer):
            # The forward multiplies by spectral_proj_multiplier: the effective M_j start at spectral_proj_init_std.
            std = config.spectral_proj_init_std / config.spectral_proj_multiplier
            init.normal_(module.spectral_proj, mean=0.0, std=std)
            init.constant_(module.gate_out.bias, self.config.gate_bias_init)
        elif isinstance(module, ESSSMSpectralBasis) and not getattr(module.filters, "_is_hf_initialized", False):
            # Skipped when the buffers came from a checkpoint: they are never recomputed on load.
            eigenvalues, filters = spectral_filters(self.config.max_position_embeddings, self.config.num_spectral_filters)
            init.copy_(module.eigenvalues, eigenvalues.float())
            init.copy_(module.filters, filters.float())

    def sliced_config(self, spectral_budget: int | list[int]) -> ESSSMConfig:
        """The config of `slice_to_budget(spectral_budget)`: the budget's channels become the full set."""
        layer_budgets = self.config.layer_budgets(resolve_spectral_budget(spectral_budget, self.config))
        config = copy.deepcopy(self.config)
        config.num_spectral_filters = max(layer_budgets)
        config.num_spectral_filters_per_layer = None if len(set(layer_budgets)) == 1 else list(layer_budgets)
        config.min_spectral_budget = min(config.min_spectral_budget, *layer_budgets)
        config.spectral_budget = within_slice(config.spectral_budget, config)
        return config

    def num_parameters_at_budget(self, spectral_budget: int | list[int]) -> int:
        """The parameters a budget uses: those of `slice_to_budget(spectral_budget)`, counted without copying a
        weight (the slice is built on the meta device)."""
        with torch.device("meta"):
            return type(self)(self.sliced_config(spectral_budget)).num_parameters()

    def slice_to_budget(self, spectral_budget: int | list[int]) -> "ESSSMPreTrainedModel":
        """A new, smaller model of the same class whose full budget is `spectral_budget`, an integer or one per layer.

        Its outputs equal this model's at that budget: the channels above it are dropped, which is exactly slicing
        the filters, eigenvalues, projections M_j and the gate's last rows (per layer: each layer's own, and the
        filters to the largest). A default budget above the slice's is dropped: the slice runs at its full budget.
        """
        config = self.sliced_config(spectral_budget)
        sliced = type(self)(config).to(device=self.device, dtype=self.dtype)
        source = self.state_dict()
        state = {
            name: source[name][tuple(slice(0, n) for n in target.shape)].clone()
            for name, target in sliced.state_dict().items()
        }
        sliced.load_state_dict(state)
        if self.can_generate():
            sliced.generation_config = copy.deepcopy(self.generation_config)
            default = getattr(sliced.generation_config, "spectral_budget", None)
            sliced.generation_config.spectral_budget = within_slice(default, config)
        sliced.train(self.training)
        return sliced


def within_slice(default_budget, sliced_config: ESSSMConfig):
    """A default budget kept by a slice when valid there, else None (the slice's full budget)."""
    if default_budget is None:
        return None
    try:
        return check_spectral_budget(default_budget, sliced_config)
    except ValueError:
        return None


class ESSSMModel(ESSSMPreTrainedModel):
    """The ES-SSM backbone: token embedding (or a linear projection of real-valued inputs), blocks, final norm."""

    def __init__(self, config: ESSSMConfig):
        super().__init__(config)
        if config.input_size is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            self.input_proj = nn.Linear(config.input_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.spectral_basis = ESSSMSpectralBasis(config)
        self.layers = nn.ModuleList(ESSSMBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def embed(self, input_ids=None, inputs_embeds=None, input_values=None) -> torch.Tensor:
        """Exactly one of the three input kinds, as (B, T, D)."""
        given = [name for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                                          ("input_values", input_values)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"Pass exactly one of input_ids, inputs_embeds or input_values; got {given or 'none'}.")
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is not None:
            if self.config.input_size is not None:
                raise ValueError(f"This model reads real-valued `input_values` (input_size={self.config.input_size}), "
                                 "not `input_ids`.")
            return self.embed_tokens(input_ids)
        if self.config.input_size is None:
            raise ValueError("`input_values` needs a model built with `input_size` set in its config.")
        if input_values.ndim == 2 and self.config.input_size == 1:
            input_values = input_values.unsqueeze(-1)
        if input_values.ndim != 3 or input_values.shape[-1] != self.config.input_size:
            raise ValueError(f"input_values must have shape (batch, seq_len, {self.config.input_size})"
                             f"{' or (batch, seq_len)' if self.config.input_size == 1 else ''}; "
                             f"got {tuple(input_values.shape)}.")
        return self.input_proj(input_values.to(self.input_proj.weight.dtype))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        spectral_budget: int | list[int] | None = None,
        cache: ESSSMCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        cache (`ESSSMCache`, *optional*):
            Continue this cache: the inputs are the tokens it has not seen, and `attention_mask` covers either
            them or the whole sequence. It is updated in place and returned.
        use_cache (`bool`, *optional*):
            Start a new cache and return it. Off by default: a cache keeps every block's input alive.
        """
        budget = resolve_spectral_budget(spectral_budget, self.config)
        layer_budgets = self.config.layer_budgets(budget)
        hidden_states = self.embedding_dropout(self.embed(input_ids, inputs_embeds, input_values))  # (B, T, D)
        seq_len = hidden_states.shape[1]
        if cache is not None and not isinstance(cache, ESSSMCache):
            raise ValueError(f"ES-SSM continues only an ESSSMCache (it keeps every block's whole input history), got "
                             f"{type(cache).__name__}. Pass use_cache=True without a cache to start one.")
        if use_cache is False and cache is not None:
            raise ValueError("use_cache=False contradicts the cache passed along: drop one of them.")
        if use_cache and cache is None:
            cache = ESSSMCache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        self._check_lengths(past, hidden_states, attention_mask, cache)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        padding_mask = None
        if attention_mask is not None:
            padding_mask = attention_mask[:, -seq_len:, None].to(hidden_states.dtype)  # (B, T, 1)
        if cache is not None:
            self._extend_cache(cache, hidden_states, padding_mask, layer_budgets)
        # Blocks continuing a cache convolve from their history instead; the whole-sequence path needs the spectrum,
        # once for the largest layer budget: each block reads its first channels.
        filter_spectrum = self.spectral_basis.filter_spectrum(seq_len, max(layer_budgets)) if past == 0 else None
        all_hidden_states = () if output_hidden_states else None
        for block, layer_budget in zip(self.layers, layer_budgets):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(hidden_states, filter_spectrum, layer_budget, padding_mask, cache=cache,
                                  spectral_basis=self.spectral_basis)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)

    def _check_lengths(self, past: int, hidden_states: torch.Tensor, attention_mask, cache) -> None:
        """Refuse, before any work, inputs that the filters or the cache cannot continue."""
        seq_len = hidden_states.shape[1]
        if past + seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"Input sequence length {past + seq_len} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}, the length of the spectral filters"
                f"{f' ({past} cached + {seq_len} new tokens)' if past else ''}. Build the model with a "
                f"larger `max_position_embeddings` in its config to process longer sequences."
            )
        if cache is not None:
            cache.check_batch_size(hidden_states.shape[0])
        if past and attention_mask is not None and attention_mask.shape[1] not in (seq_len, past + seq_len):
            raise ValueError(f"With a cache of {past} tokens and {seq_len} new ones, attention_mask must cover the new "
                             f"tokens or all {past + seq_len}; got length {attention_mask.shape[1]}.")

    def _extend_cache(self, cache: ESSSMCache, embeddings: torch.Tensor, padding_mask,
                      layer_budgets: tuple[int, ...]) -> None:
        """Record the new block-0 inputs, after rebuilding the history if the cache was built at other budgets."""
        if cache.get_seq_length() > 0 and cache.spectral_budget != layer_budgets:
            # Block 0's inputs are the same at every budget, deeper ones are not: one forward pass over the history
            # at the new budget gives every block the inputs a full forward at that budget would give it.
            rebuilt = ESSSMCache(self.config, future_fill=cache.future_fill)
            self(inputs_embeds=cache.embeddings.values, attention_mask=cache.attention_mask.values,
                 spectral_budget=layer_budgets, cache=rebuilt, output_hidden_states=False)
            cache.layers = rebuilt.layers
        cache.spectral_budget = layer_budgets
        cache.embeddings.append(embeddings)
        mask = padding_mask[..., 0] if padding_mask is not None else embeddings.new_ones(embeddings.shape[:2])
        cache.attention_mask.append(mask)


class ESSSMForCausalLM(ESSSMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ESSSMConfig):
        super().__init__(config)
        if config.input_size is not None:
            raise ValueError("ESSSMForCausalLM predicts tokens: build it with input_size=None.")
        self.model = ESSSMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # A generation config flagged as derived from the model config loses custom entries when reloaded, and
        # a default `spectral_budget` is one.
        self.generation_config._from_model_config = False

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        spectral_budget: int | list[int] | None = None,
        cache: ESSSMCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            spectral_budget=spectral_budget,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)

    def generate(self, *args, draft_budget: int | None = None, **kwargs):
        r"""`GenerationMixin.generate`, plus self-speculative decoding.

        draft_budget (`int`, *optional*):
            Draft tokens with these same weights at this smaller spectral budget, and verify each round of drafts at
            `spectral_budget` in one forward pass (transformers' assisted decoding): greedy decoding gives the tokens
            of plain decoding at `spectral_budget`, sampling its distribution (speculative sampling). Batch size 1.
            Drafts per round: `num_assistant_tokens` (default 3), adapted during the call with
            `num_assistant_tokens_schedule="heuristic"`.
        """
        if draft_budget is None:
            return super().generate(*args, **kwargs)
        others = [name for name in ("assistant_model", "prompt_lookup_num_tokens") if kwargs.get(name) is not None]
        if others:
            raise ValueError(f"draft_budget drafts with the model itself; it cannot be combined with {others}.")
        # The model is its own assistant; `_get_candidate_generator` builds the draft from the generation config.
        return super().generate(*args, assistant_model=self, draft_budget=draft_budget, **kwargs)

    def _prepare_generation_config(self, generation_config, **kwargs):
        # Asked for, or left to transformers' default (20 drafts per round, meant for a separate, far cheaper model)?
        num_drafts = next((value for value in (kwargs.get("num_assistant_tokens"),
                                               getattr(generation_config, "num_assistant_tokens", None),
                                               self.generation_config.num_assistant_tokens) if value is not None), None)
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        # A budget set on a generation config (e.g. the model's, saved with it) stays there unless handed on; a
        # generate kwarg overrides it. Every forward gets it as a Python int: beam expansion repeats tensors.
        budget = model_kwargs.pop("spectral_budget", getattr(generation_config, "spectral_budget", None))
        if generation_config.is_assistant:
            # Assisted decoding hands the main model's kwargs and generation config to its assistant, the main budget
            # included: an assistant drafts at its own default budget.
            budget = getattr(self.generation_config, "spectral_budget", None)
        model_kwargs["spectral_budget"] = resolve_spectral_budget(budget, self.config)
        draft_budget = model_kwargs.pop("draft_budget", None)
        if draft_budget is not None:
            generation_config.draft_budget = resolve_draft_budget(draft_budget, model_kwargs["spectral_budget"],
                                                                  self.config)
            if num_drafts is not None and (isinstance(num_drafts, bool) or not isinstance(num_drafts, int)
                                           or num_drafts < 1):
                raise ValueError(f"num_assistant_tokens (drafts per round) must be a positive integer; got "
                                 f"{num_drafts!r}.")
            generation_config.num_assistant_tokens = num_drafts or DEFAULT_DRAFT_TOKENS
        return generation_config, model_kwargs

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 assistant_model=None, target_tokenizer=None, assistant_tokenizer=None):
        if getattr(generation_config, "draft_budget", None) is None:
            return super()._get_candidate_generator(generation_config, input_ids, inputs_tensor, logits_processor,
                                                    model_kwargs, assistant_model, target_tokenizer,
                                                    assistant_tokenizer)
        return ESSSMDraftCandidateGenerator(self, generation_config, logits_processor, model_kwargs["cache"])

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # Runs before any forward pass: refuse here what the filters are too short for, not after the work. Inputs
        # that continue a cache may also cover it: the exact length is known in `_prefill`, this is its lower bound.
        self._check_generation_length(max_cache_length + 1, 0)
        cache = model_kwargs.get("cache")
        continued = isinstance(cache, ESSSMCache) and cache.get_seq_length() > 0
        if continued and generation_mode == GenerationMode.ASSISTED_GENERATION:
            # Its first forward feeds the whole sequence, whatever a cache already holds.
            raise ValueError("Assisted decoding (assistant_model, prompt_lookup_num_tokens, draft_budget) starts "
                             "from an empty cache: pass the whole sequence without one.")
        if cache is None and generation_config.use_cache:
            model_kwargs["cache"] = ESSSMCache(self.config)  # generate would build a DynamicCache otherwise
        else:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                  max_cache_length)

    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
        # transformers' rule for continuing a cache: the inputs are the whole sequence unless the attention mask is
        # longer than them (then they are the new tokens and it covers the cache too). generate does not slice the
        # inputs of a linear cache itself, so the positions the cache holds are checked and skipped here.
        cache = model_kwargs.get("cache")
        seen = cache.get_seq_length() if isinstance(cache, ESSSMCache) else 0
        if not seen or model_kwargs.get("use_cache") is False:  # forward refuses a cache with use_cache=False
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        embeds = model_kwargs.get("inputs_embeds") if is_first_iteration else None
        inputs = embeds if embeds is not None else input_ids
        mask = model_kwargs.get("attention_mask")
        mask_length = mask.shape[1] if mask is not None else getattr(generation_config, "_mask_length", None)
        new_tokens = generation_config.max_length - input_ids.shape[1]
        if mask_length is not None and mask_length > inputs.shape[1]:
            self._check_generation_length(seen + inputs.shape[1] + new_tokens, seen)
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        if mask_length is not None and mask_length < inputs.shape[1]:
            raise ValueError(f"attention_mask covers {mask_length} positions, fewer than the {inputs.shape[1]} inputs.")
        if inputs.shape[1] < seen:
            raise ValueError(
                f"The cache holds {seen} tokens but the inputs, read as the whole sequence, only {inputs.shape[1]}. "
                f"Pass the whole sequence, or only the new tokens with an attention_mask covering all {seen} cached "
                "tokens and them."
            )
        cache.check_prefix(embeds if embeds is not None else self.get_input_embeddings()(input_ids[:, :seen]), mask)
        if inputs.shape[1] == seen:  # nothing new: feed the last token again for the logits of the next one
            cache.crop(-1)
            seen -= 1
        if embeds is not None:
            model_kwargs = {**model_kwargs, "inputs_embeds": embeds[:, seen:]}
        else:
            input_ids = input_ids[:, seen:]
        return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)

    def _check_generation_length(self, final_length: int, seen: int) -> None:
        if final_length > self.config.max_position_embeddings:
            raise ValueError(
                f"generate would produce sequences of {final_length} tokens ({seen} cached + prompt + new tokens), "
                f"more than max_position_embeddings={self.config.max_position_embeddings}, the length of the "
                "spectral filters. Ask for fewer new tokens or build the model with a larger `max_position_embeddings`."
            )


class ESSSMForSequenceClassification(ESSSMPreTrainedModel):
    # The loss is a per-batch mean, so the Trainer must divide it by the accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ESSSMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ESSSMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) -> (B, D): mean over the non-padding positions, or the last non-padding position."""
        if attention_mask is None:
            attention_mask = hidden_states.new_ones(hidden_states.shape[:2])
        mask = attention_mask[:, -hidden_states.shape[1]:].to(hidden_states.dtype)  # (B, T)
        if self.config.classifier_pooling == "last":
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * (mask > 0)).argmax(dim=1)  # rightmost real token, for left or right padding
            return hidden_states[torch.arange(hidden_states.shape[0], device=mask.device), last]
        return (hidden_states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        spectral_budget: int | list[int] | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            input_values=input_values,
            spectral_budget=spectral_budget,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(self.pool(outputs.last_hidden_state, attention_mask))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "ESSSMPreTrainedModel",
    "ESSSMModel",
    "ESSSMForCausalLM",
    "ESSSMForSequenceClassification",
    "resolve_spectral_budget",
]
