"""The generation cache of ES-SSM and its exact fast decoding (epoched FutureFill, Agarwal et al. 2024).

A block's mixer output at position t needs the causal convolutions U_j(t) = sum_{s<=t} phi_j[t-s] u(s) of
its whole input history, so the cache keeps every mixer input u so far (post-norm, padding zeroed): an
exact state, unlike a fixed window. The gate and projections are per position, so nothing else is needed.

Budgets: block 0's input does not depend on the budget, every deeper block's input does (through the blocks
below it). The cache therefore records the budget it was built at and keeps block 0's input history (the
embeddings); continuing at another budget rebuilds the deeper histories from it.

Decoding cost: summing the whole history for every new token (the naive cache) is O(t k D) per token and
layer. Epoched FutureFill splits time into epochs of E steps, aligned to multiples of E: at the start t0 of
an epoch it computes how all of u[:t0] contributes to the outputs t0..t0+E-1, and each step then adds only
the direct sum over u[t0:t+1] (at most E rows). The contribution is computed block by block: block b of the
history reaches the epoch through one 2E-tap segment of the filters, so it is a size-2E FFT convolution, and
summing the blocks' products in the frequency domain is a matrix product, which costs far less than one long
FFT. Per epoch that is O(t0 k D) (the products) plus O(E log E k D) (one inverse FFT); with E ~ 3 sqrt(t) the
amortised cost per token is O(sqrt(t) k D). The naive cache is the same code with a single epoch [0, L)
that needs no FFT; it is kept as the reference FutureFill is tested against.
"""

import math
import numbers

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer

from .configuration_essm import ESSSMConfig


def epoch_length(position: int) -> int:
    """E for an epoch that serves `position`: a power of two (fast FFTs of size 2E) near 3 sqrt(position).

    Per token, an epoch's block products cost ~t/E rows and the direct sum ~E/2 rows; E ~ sqrt(t) balances them
    (3 was the fastest factor on CPU at D = 256 and t = 512..8192).
    """
    return 2 ** max(4, round(math.log2(3 * math.sqrt(max(position, 1)))))


def filter_segment_spectra(filters: torch.Tensor, size: int) -> torch.Tensor:
    """rFFTs (size 2E) of the filter segments filters[(d-1)E : (d+1)E], d = 1, 2, ...: (n, E + 1, k) complex64.

    Input block b reaches the epoch that starts at block m through lags (m-b-1)E+1 .. (m-b+1)E-1: segment m-b.
    """
    padded = torch.nn.functional.pad(filters.T, (0, 2 * size))  # (k, L + 2E), taps past L never reach an output < L
    segments = padded.unfold(1, 2 * size, size)  # (k, n, 2E)
    return torch.fft.rfft(segments, dim=-1).permute(1, 2, 0)


def future_contributions(history: torch.Tensor, segment_spectra: torch.Tensor) -> torch.Tensor:
    """What history (B, mE, D) adds to the next E outputs: (B, E, k, D) float32, block by block, exactly.

    The output p of the epoch gets sum_i u_b[i] phi[(m-b)E + p - i] from block b: entry E + p of the linear
    convolution of u_b (E taps) with segment m-b (2E taps), which a circular one of size 2E gets right, since
    nothing past entry 3E - 2 could wrap onto it.
    """
    size = segment_spectra.shape[1] - 1
    batch, length, hidden = history.shape
    blocks = history.float().reshape(batch, length // size, size, hidden)
    block_spectra = torch.fft.rfft(blocks, n=2 * size, dim=2)  # (B, m, E + 1, D)
    segments = segment_spectra[: length // size].flip(0)  # segment m-b for block b
    spectrum = torch.einsum("bnfd,nfk->bkdf", block_spectra, segments)  # (B, k, D, E + 1): summed over blocks
    return torch.fft.irfft(spectrum, n=2 * size)[..., size:].permute(0, 3, 1, 2).contiguous()


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

    def crop(self, length: int) -> None:
        """Keep the first `length` steps; the capacity stays, later appends overwrite the rest."""
        self.length = length

    def index_select(self, index: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))


class ESSSMCacheLayer(LinearAttentionLayer):
    """One block's cache: its mixer input history and the current FutureFill epoch.

    A LinearAttentionLayer so that generate treats the cache as linear (it never builds 4D masks for it); the
    conv and recurrent state slots of that class stay unused. Unlike a recurrent state, the history can be cut
    back to any earlier length exactly, which is what assisted decoding needs after rejecting draft tokens.
    """

    is_compileable = False  # the history grows every step
    is_croppable = True

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

    def latest_inputs(self, count: int) -> torch.Tensor:
        """The last `count` inputs of the history (fewer at its start): (B, <= count, D)."""
        return self.inputs.values[:, max(0, self.inputs.length - count) :]

    def convolve(self, u: torch.Tensor, spectral_basis, spectral_budget: int) -> torch.Tensor:
        """Append u (B, n, D) to the history; return its positions' convolutions (B, n, k, D), float32.

        One token, or a few (the drafts assisted decoding verifies), go through the FutureFill epochs; a longer
        chunk (a continued prompt) costs less as one FFT over the whole history. The naive cache's single epoch
        spans the whole history, so it takes only single tokens directly.
        """
        start, count = self.inputs.length, u.shape[1]
        self.append(u)
        if count > 1 and (not self.future_fill or count > epoch_length(start)):
            return spectral_basis.causal_convolution(self.inputs.values, start, spectral_budget, self.chunk_size)
        outputs = []
        end = start + count
        while start < end:
            if start >= self.epoch_stop:
                self.begin_epoch(start, spectral_basis, spectral_budget)
            stop = min(end, self.epoch_stop)
            outputs.append(self.epoch_outputs(start, stop))
            start = stop
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)

    def epoch_outputs(self, first: int, stop: int) -> torch.Tensor:
        """Convolutions at positions first..stop-1 of the current epoch: (B, n, k, D), float32.

        The epoch's future (all inputs before it) plus the direct sum over its own inputs up to each position.
        """
        window = self.inputs.values[:, self.epoch_start : stop].float()  # (B, w, D)
        positions = torch.arange(self.epoch_start, stop, device=window.device)
        lags = positions[first - self.epoch_start :].unsqueeze(1) - positions  # (n, w): t - s
        taps = self.epoch_filters[lags.clamp_min(-1)]  # (n, w, k); lag -1 is the zero row: inputs after t
        conv = torch.einsum("nsk,bsd->bnkd", taps, window)
        if self.future is not None:
            conv = conv + self.future[:, first - self.epoch_start : stop - self.epoch_start]
        return conv

    def begin_epoch(self, position: int, spectral_basis, spectral_budget: int) -> None:
        """Start the epoch that serves `position`: the naive cache's only one, or the aligned one of length E."""
        size = epoch_length(position) if self.future_fill else self.max_length
        if self.epoch_filters is None or len(self.epoch_filters) != size + 1:  # E grows with the context, rarely
            filters = spectral_basis.scaled_filters(self.max_length, spectral_budget)  # (L, k)
            self.epoch_filters = torch.nn.functional.pad(filters[:size], (0, 0, 0, 1))
            self.segment_spectra = filter_segment_spectra(filters, size) if self.future_fill else None
        self.epoch_start = position // size * size
        self.epoch_stop = min(self.epoch_start + size, self.max_length)
        history = self.inputs.values[:, : self.epoch_start]
        self.future = future_contributions(history, self.segment_spectra) if self.epoch_start else None

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove inputs (a count <= 0, as transformers passes it); ESSSMCache checks it."""
        self.inputs.crop(self.inputs.length + tokens_to_remove)
        if self.inputs.length < self.epoch_start:  # the epoch's future summed inputs that are gone: start afresh
            self.epoch_start, self.epoch_stop, self.future = 0, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.inputs.index_select(beam_idx)
        if self.future is not None:
            self.future = self.future.index_select(0, beam_idx.to(self.future.device))

    def reset(self) -> None:
        self.inputs = TimeBuffer(self.max_length)  # (B, t, D) mixer inputs u
        self.epoch_start, self.epoch_stop = 0, 0  # the epoch serves outputs epoch_start..epoch_stop-1
        self.epoch_filters = None  # (E + 1, k): filter taps 0..E-1 of the direct sums, then a row of zeros
        self.segment_spectra = None  # (n, E + 1, k): see filter_segment_spectra
        self.future = None  # (B, E, k, D): what u[:epoch_start] adds to the epoch's outputs


class ESSSMCache(Cache):
    """The generation cache of ES-SSM: one ESSSMCacheLayer per block plus what a budget change needs.

    Args:
        config: the model's config.
        future_fill: decode with epoched FutureFill (default); `False` gives the naive cache, where every new
            output sums its whole history directly (the reference, O(t) per token).

    `spectral_budget` holds the per-block budgets the deeper histories were built at; the model rebuilds them from
    the embeddings when a call continues the cache at other budgets. A forward that continues a cache takes the
    tokens it has not seen (its attention mask may cover them or the whole sequence); `generate` also takes the
    whole sequence and skips what the cache holds. `crop` cuts the cache back to any earlier length exactly.
    """

    def __init__(self, config: ESSSMConfig, future_fill: bool = True):
        super().__init__(layers=[ESSSMCacheLayer(config, future_fill) for _ in range(config.num_hidden_layers)])
        self.max_length = config.max_position_embeddings
        self.future_fill = future_fill
        self.reset()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    @property
    def batch_size(self) -> int:
        return self.embeddings.data.shape[0] if self.embeddings.data is not None else -1

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens exactly: continuing equals a fresh forward over the kept ones.

        transformers' convention (assisted decoding calls it so): a count <= 0 of tokens to remove, so
        `cache.crop(m - cache.get_seq_length())` keeps the first m.
        """
        length = self.get_seq_length()
        if (isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, numbers.Integral)
                or not -length <= tokens_to_remove <= 0):
            raise ValueError(f"crop takes minus the number of tokens to remove: an integer in [-{length}, 0] for this "
                             f"cache of {length} tokens; got {tokens_to_remove!r}.")
        if tokens_to_remove == -length:
            self.reset()  # as new: the next call may start at any budget
            return
        super().crop(tokens_to_remove)
        self.embeddings.crop(length + tokens_to_remove)
        self.attention_mask.crop(length + tokens_to_remove)

    def follow(self, source: "ESSSMCache", start: int, layer_budgets: tuple[int, ...]) -> None:
        """Keep this cache's first `start` positions and append `source`'s from there on (every block's inputs, the
        embeddings, the mask), to be continued at `layer_budgets` (one budget per block).

        This mixes budgets on purpose, for a draft model only: the histories copied from a cache built at the full
        budget are continued at a small one without the rebuild a budget change otherwise costs (a forward pass over
        the whole context), and drafts conditioned on full-budget histories propose what the full budget would at
        least as often.
        """
        self.crop(start - self.get_seq_length())
        for layer, source_layer in zip(self.layers, source.layers):
            layer.append(source_layer.inputs.values[:, start:])
        self.embeddings.append(source.embeddings.values[:, start:])
        self.attention_mask.append(source.attention_mask.values[:, start:])
        self.spectral_budget = layer_budgets

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse inputs of another batch size than the sequences this cache holds (an empty cache takes any)."""
        if self.get_seq_length() and batch_size != self.batch_size:
            raise ValueError(f"The cache holds {self.batch_size} sequences but the inputs have {batch_size}; "
                             "cache.reorder_cache(rows) selects or repeats its rows.")

    def check_prefix(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Refuse whole-sequence inputs (B, n, D) whose first positions are not the ones this cache holds.

        Block 0's inputs and the padding mask determine every deeper history, so equal embeddings and masks mean
        the cache is exactly what a forward over those positions would build.
        """
        seen, batch = self.get_seq_length(), embeddings.shape[0]
        self.check_batch_size(batch)
        mask = attention_mask[:, :seen] if attention_mask is not None else embeddings.new_ones(batch, seen)
        differs = (embeddings[:, :seen] != self.embeddings.values).any(-1) | (mask != self.attention_mask.values)
        if differs.any():
            row, position = differs.nonzero()[0].tolist()
            raise ValueError(
                f"The inputs cover the {seen} tokens this cache holds but differ from them at position {position} of "
                f"row {row} (token or attention mask). Pass the sequence the cache was built from, or only the new "
                f"tokens with an attention_mask covering all {seen} cached tokens and them."
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.embeddings.index_select(beam_idx)
        self.attention_mask.index_select(beam_idx)

    def reset(self) -> None:
        super().reset()
        self.embeddings = TimeBuffer(self.max_length)  # (B, t, D) block 0's inputs: budget independent
        self.attention_mask = TimeBuffer(self.max_length)  # (B, t), 0 at padding
        self.spectral_budget = None


__all__ = ["ESSSMCache", "ESSSMCacheLayer", "TimeBuffer", "epoch_length", "future_contributions"]
