"""The generation cache of ES-SSM and its exact fast decoding (epoched FutureFill, DESIGN 4).

A block's mixer output at position t needs the causal convolutions U_j(t) = sum_{s<=t} phi_j[t-s] u(s) of
its whole input history, so the cache keeps every mixer input u so far (post-norm, padding zeroed): an
exact state, unlike a fixed window. The gate and projections are per position, so nothing else is needed.

Budgets: block 0's input does not depend on the budget, every deeper block's input does (through the blocks
below it). The cache therefore records the budget it was built at and keeps block 0's input history (the
embeddings); continuing at another budget rebuilds the deeper histories from it.

Decoding cost: summing the whole history for every new token (the naive cache) is O(t k D) per token and
layer. Epoched FutureFill splits the history at the start t0 of an epoch of E steps: one FFT computes how all
of u[:t0] contributes to the outputs t0..t0+E-1, and each step adds only the direct sum over u[t0:t+1]. With
E ~ sqrt(t0 log t0) the amortised cost per token is O(sqrt(t log t) k D). The naive cache is the same code
with a single epoch [0, L) that never needs an FFT; it is kept as the reference FutureFill is tested against.
"""

import math

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer

from .configuration_essm import ESSSMConfig

# E = EPOCH_SCALE * sqrt(t0 log2 t0): the epoch FFT costs ~50x more per input row than a direct-sum row
# (measured on CPU at D=256), so longer epochs than sqrt(t log t) pay off; 2 also keeps the FutureFill
# buffer (E x k x D floats per layer) under the size of the input history at long contexts.
EPOCH_SCALE = 2.0
MIN_EPOCH = 16


def epoch_length(start: int) -> int:
    """Steps served by one FutureFill FFT taken at position `start`."""
    return max(MIN_EPOCH, math.ceil(EPOCH_SCALE * math.sqrt(start * math.log2(max(start, 2)))))


class TimeBuffer:
    """A (B, T, ...) tensor that grows along time with amortised O(1) appends: its capacity doubles, up to L."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.data = None  # (B, capacity, ...)
        self.length = 0

    @property
    def values(self) -> torch.Tensor:
        return self.data[:, : self.length]

    def append(self, x: torch.Tensor) -> None:
        end = self.length + x.shape[1]
        if self.data is None or end > self.data.shape[1]:
            capacity = min(max(end, 2 * self.length), self.max_length)
            grown = x.new_empty(x.shape[0], capacity, *x.shape[2:])
            if self.data is not None:
                grown[:, : self.length] = self.values
            self.data = grown
        self.data[:, self.length : end] = x
        self.length = end

    def index_select(self, index: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))


class ESSSMCacheLayer(LinearAttentionLayer):
    """One block's cache: its mixer input history and the current FutureFill epoch.

    A LinearAttentionLayer so that generate treats the cache as linear (it never slices the inputs or builds
    4D masks for it); the conv and recurrent state slots of that class stay unused.
    """

    is_compileable = False  # the history grows every step

    def __init__(self, config: ESSSMConfig, future_fill: bool = True):
        super().__init__()
        self.max_length = config.max_position_embeddings
        self.chunk_size = config.spectral_chunk_size
        self.future_fill = future_fill
        self.reset()

    def get_seq_length(self) -> int:
        return self.inputs.length

    def append(self, u: torch.Tensor) -> None:
        self.inputs.append(u)

    def convolve(self, u: torch.Tensor, spectral_basis, spectral_budget: int) -> torch.Tensor:
        """Append u (B, n, D) to the history; return its positions' convolutions (B, n, k, D), float32."""
        start = self.inputs.length
        self.append(u)
        if u.shape[1] > 1:  # a chunk of new positions: one FFT over the whole history
            return spectral_basis.causal_convolution(self.inputs.values, start, self.inputs.length, spectral_budget,
                                                     self.chunk_size)
        if start >= self.epoch_stop:
            self.begin_epoch(start if self.future_fill else 0, spectral_basis, spectral_budget)
        window = self.inputs.values[:, self.epoch_start :].float()  # (B, w, D), w = start - epoch_start + 1
        conv = torch.einsum("sk,bsd->bkd", self.window_filters[-window.shape[1] :], window)  # (B, k, D)
        if self.future is not None:
            conv = conv + self.future[:, start - self.epoch_start]
        return conv.unsqueeze(1)

    def begin_epoch(self, start: int, spectral_basis, spectral_budget: int) -> None:
        stop = min(start + epoch_length(start), self.max_length) if self.future_fill else self.max_length
        self.epoch_start, self.epoch_stop = start, stop
        self.window_filters = spectral_basis.scaled_filters(stop - start, spectral_budget).flip(0)
        self.future = None
        if start > 0:  # the naive cache never gets here: its only epoch starts at 0
            self.future = spectral_basis.causal_convolution(self.inputs.values[:, :start], start, stop,
                                                            spectral_budget, self.chunk_size)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.inputs.index_select(beam_idx)
        if self.future is not None:
            self.future = self.future.index_select(0, beam_idx.to(self.future.device))

    def reset(self) -> None:
        self.inputs = TimeBuffer(self.max_length)  # (B, t, D) mixer inputs u
        self.epoch_start, self.epoch_stop = 0, 0  # the epoch serves outputs epoch_start..epoch_stop-1
        self.window_filters = None  # (epoch_stop - epoch_start, k): time-reversed filters of the direct sum
        self.future = None  # (B, epoch_stop - epoch_start, k, D): what u[:epoch_start] adds to those outputs


class ESSSMCache(Cache):
    """The generation cache of ES-SSM: one ESSSMCacheLayer per block plus what a budget change needs.

    Args:
        config: the model's config.
        future_fill: decode with epoched FutureFill (default); `False` gives the naive cache, where every new
            output sums its whole history directly (the reference, O(t) per token).

    `spectral_budget` is the budget the deeper histories were built at; the model rebuilds them from the
    embeddings when a call continues the cache at another budget. Inputs that continue a cache are the unseen
    tokens only; an attention mask may cover the unseen tokens or the whole sequence.
    """

    def __init__(self, config: ESSSMConfig, future_fill: bool = True):
        super().__init__(layers=[ESSSMCacheLayer(config, future_fill) for _ in range(config.num_hidden_layers)])
        self.max_length = config.max_position_embeddings
        self.future_fill = future_fill
        self.reset()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.embeddings.index_select(beam_idx)
        self.attention_mask.index_select(beam_idx)

    def reset(self) -> None:
        super().reset()
        self.embeddings = TimeBuffer(self.max_length)  # (B, t, D) block 0's inputs: budget independent
        self.attention_mask = TimeBuffer(self.max_length)  # (B, t), 0 at padding
        self.spectral_budget = None


__all__ = ["ESSSMCache", "ESSSMCacheLayer", "TimeBuffer", "epoch_length"]
