"""Configuration of Elastic Spectral State Space Models (ES-SSM)."""

import difflib
import inspect
import math
import numbers
import warnings

from transformers import PreTrainedConfig

# Written into every saved config so that a folder or Hub repo loads with trust_remote_code=True
# through any of the four Auto classes, not only the one the model was saved from.
ESSM_AUTO_MAP = {
    "AutoConfig": "configuration_essm.ESSSMConfig",
    "AutoModel": "modeling_essm.ESSSMModel",
    "AutoModelForCausalLM": "modeling_essm.ESSSMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_essm.ESSSMForSequenceClassification",
}

# The behaviour of checkpoints saved before a field was added; `from_dict` (and so `from_pretrained`) fills them in.
FIELDS_BEFORE_THEY_EXISTED = {"spectral_proj_multiplier": 1.0, "spectral_proj_init_std": 0.02}


def is_real_number(value) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ESSSMConfig.{name} must be a positive integer, got {value!r}.")


def check_spectral_budget(budget, config: "ESSSMConfig", name: str = "spectral_budget"):
    """A budget as the model reads it: an integer k in [min_spectral_budget, num_spectral_filters], which runs every
    layer at k (or at its own K when that is smaller), or one integer per layer, each in [min_spectral_budget, the
    layer's K]. Returns the int, or the per-layer budgets as a list (as JSON keeps them); raises a ValueError naming
    the valid range."""
    low, full = config.min_spectral_budget, config.layer_spectral_filters
    valid = (f"an integer in [{low}, {config.num_spectral_filters}] (min_spectral_budget to num_spectral_filters), "
             f"or a list of {len(full)} integers, one per layer, each in [{low}, that layer's K] (K per layer: "
             f"{list(full)})")
    if isinstance(budget, (list, tuple)):
        if len(budget) != len(full):
            raise ValueError(f"{name} must be {valid}; got {len(budget)} per-layer budgets {list(budget)!r}.")
        for layer, (k, top) in enumerate(zip(budget, full)):
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not low <= k <= top:
                raise ValueError(f"{name} must be {valid}; got {k!r} for layer {layer} in {list(budget)!r}.")
        return [int(k) for k in budget]
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"{name} must be {valid}; got {budget!r} of type {type(budget).__name__}.")
    if not low <= budget <= config.num_spectral_filters:
        raise ValueError(f"{name} must be {valid}; got {budget}.")
    return int(budget)


class ESSSMConfig(PreTrainedConfig):
    r"""
    Configuration of an ES-SSM: a stack of pre-norm residual blocks whose sequence mixer convolves
    the input with the top eigenvectors of a fixed Hankel matrix and mixes them through a per-token
    gate. The model is trained once and can run at any spectral budget `k` in
    `[min_spectral_budget, num_spectral_filters]` afterwards, or at one budget per layer.

    Args:
        vocab_size (`int`, defaults to 259): token vocabulary (byte-level: 256 bytes plus pad, bos, eos).
        hidden_size (`int`, defaults to 256): model width D.
        num_hidden_layers (`int`, defaults to 8): number of residual blocks.
        num_spectral_filters (`int`, defaults to 32): the full spectral budget K.
        max_position_embeddings (`int`, defaults to 4096): filter length L, the longest sequence.
        num_spectral_filters_per_layer (`list[int]`, *optional*): each layer's own full budget K_l, at most K (None:
            K for every layer). A model sliced to per-layer budgets (`slice_to_budget([4, 8, ...])`) has them; an
            integer budget k then runs layer l at min(k, K_l).
        min_spectral_budget (`int`, defaults to 2): smallest budget the model accepts.
        spectral_budget (`int` or `list[int]`, *optional*): the budget the model runs at when a call passes none
            (None: the full K), as an integer or one integer per layer. Pipelines, `Trainer.evaluate` and any other code that calls the model without the argument
            use it; a call's `spectral_budget` still wins, and so do the draws of budget-dropout training. Saved
            with the model; `from_pretrained(path, spectral_budget=k)` sets it at load time.
        intermediate_size (`int`, *optional*): feed-forward width; `None` means 4 * D, `0` disables the feed-forward.
        gate_hidden_size (`int`, *optional*): hidden width of the gate MLP; `None` means D // 2.
        gate_bias_init (`float`, defaults to -2.0): initial bias of the gate logits.
        spectral_proj_multiplier (`float`, defaults to 100.0): the mixer uses `c * M_j`, with the stored M_j
            initialised at `spectral_proj_init_std / c`, so the function at initialisation does not depend on `c`
            but every optimizer step moves the effective projections `c` times as far under Adam (weight decay is
            unchanged). Each M_j reaches the output through sigma_j^(1/4) (0.07 and below from channel 6 at L=256)
            times a gate weight of about 1/k, so without it the spectral path learns hundreds of times slower than
            a plain linear layer. How the default was chosen: docs/training.md. Configs saved before this field
            existed load with 1.0, their trained behaviour.
        spectral_proj_init_std (`float`, defaults to 1e-3): std of the effective projections `c * M_j` at
            initialisation (the paper's value).
        local_conv_size (`int`, defaults to 0): width of a depthwise causal convolution over the mixer's last
            inputs, added to its output beside the skip matrix at every budget (0: none, the paper's mixer). It
            gives the mixer patterns a few steps long, which the slowly varying spectral filters (channel j changes
            sign j - 1 times over L steps) reach only weakly. Measured in docs/training.md: in short runs it
            changed ListOps, the byte LM and spoken digits little and slowed a long-range recall task, so it is off
            by default.
        spectral_chunk_size (`int`, defaults to 8): at most this many channels are projected together by one GEMM
            (bigger chunks mean bigger GEMMs).
        spectral_chunk_mb (`float`, defaults to 64.0): and at most as many as keep one chunk's float32
            convolution output within this many MB, and within the paths' own caps (16 MB for inference and
            recomputed training, 30 MB for kept training), so that memory stops growing with the budget on long
            inputs. Inference and recomputed training count one block of sequences' output (see
            spectral_saved_mb), kept training the whole batch's.
        spectral_recompute (`bool`, defaults to True): in training, recompute the channels' convolutions in
            backward instead of keeping them (two custom operators, spectral_channels.py: forward saves the input
            spectrum, the gate, the projections and the convolutions within spectral_saved_mb, both run the FFTs one
            channel at a time and keep each chunk's features in buffers that all layers and steps reuse), so that
            activation memory does not grow with the budget past that cap, compiled (torch.compile) or not. Set it
            to False to keep them (plain autograd, chunks of under 30 MB; one chunk when compiled): memory then
            grows in proportion to the budget, for about the same speed (docs/performance.md). Outputs and gradients
            are the same. Inference runs the forward operator either way.
        spectral_saved_mb (`float`, defaults to 30.0): with spectral_recompute, the gated convolutions of the
            first channels (the projections' inputs) are saved for backward instead of recomputed, up to this many
            MB per layer and block of sequences. The operators take the batch in blocks whose one-channel FFT output
            (b, D, 2T) float32 is about 2 MB: one sequence from D=256 and L=1024 on, several below. A channel costs
            b x D x T float32 of a block: at D=256, 30 channels per sequence at L=1024, 7 at L=4096, none past
            L=30720. Each saved channel spares one of its three FFTs per step and its product with the gate in
            backward; the memory stays within the cap times the number of blocks whatever the budget, and so grows
            with the batch as every activation does. The default keeps each saved block under 32 MB, above which
            glibc gives every allocation fresh pages that the kernel zeroes (docs/performance.md). 0 recomputes
            every channel.
        embedding_dropout (`float`, defaults to 0.0): dropout on the token embeddings (or input projection).
        hidden_dropout (`float`, defaults to 0.0): dropout on the mixer and feed-forward outputs.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth rate of the last block (linear in depth).
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of linear layers.
        input_size (`int`, *optional*): when set, the model reads real-valued features `input_values` of this
            size per step through a linear input projection instead of token embeddings.
        classifier_pooling (`str`, defaults to `"mean"`): `"mean"` over non-padding positions or `"last"`.
    """

    model_type = "essm"

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 256,
        num_hidden_layers: int = 8,
        num_spectral_filters: int = 32,
        num_spectral_filters_per_layer: list[int] | None = None,
        max_position_embeddings: int = 4096,
        min_spectral_budget: int = 2,
        spectral_budget: int | list[int] | None = None,
        intermediate_size: int | None = None,
        gate_hidden_size: int | None = None,
        gate_bias_init: float = -2.0,
        spectral_proj_multiplier: float = 100.0,
        spectral_proj_init_std: float = 1e-3,
        local_conv_size: int = 0,
        spectral_chunk_size: int = 8,
        spectral_chunk_mb: float = 64.0,
        spectral_recompute: bool = True,
        spectral_saved_mb: float = 30.0,
        embedding_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        input_size: int | None = None,
        classifier_pooling: str = "mean",
        use_cache: bool = True,
        pad_token_id: int | None = 256,
        bos_token_id: int | None = 257,
        eos_token_id: int | None = 258,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_spectral_filters = num_spectral_filters
        self.num_spectral_filters_per_layer = num_spectral_filters_per_layer
        self.max_position_embeddings = max_position_embeddings
        self.min_spectral_budget = min_spectral_budget
        self.spectral_budget = spectral_budget
        check_positive_int("hidden_size", hidden_size)  # the defaults below are derived from it
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.gate_hidden_size = max(1, hidden_size // 2) if gate_hidden_size is None else gate_hidden_size
        self.gate_bias_init = gate_bias_init
        self.spectral_proj_multiplier = spectral_proj_multiplier
        self.spectral_proj_init_std = spectral_proj_init_std
        self.local_conv_size = local_conv_size
        self.spectral_chunk_size = spectral_chunk_size
        self.spectral_chunk_mb = spectral_chunk_mb
        self.spectral_recompute = spectral_recompute
        self.spectral_saved_mb = spectral_saved_mb
        self.embedding_dropout = embedding_dropout
        self.hidden_dropout = hidden_dropout
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.input_size = input_size
        self.classifier_pooling = classifier_pooling
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        kwargs.setdefault("auto_map", dict(ESSM_AUTO_MAP))
        self._warn_about_likely_typos(kwargs)
        super().__init__(**kwargs)
        self._validate_essm_fields()

    @classmethod
    def _warn_about_likely_typos(cls, extra_fields) -> None:
        """transformers configs keep unknown keys as attributes, so a misspelled field would be ignored silently."""
        known = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"})
        for name in extra_fields:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if close:
                warnings.warn(f"ESSSMConfig got the unknown field {name!r}: did you mean {close[0]!r}? It is kept as an "
                              "extra attribute, which the model does not read.", UserWarning, stacklevel=3)

    def _validate_essm_fields(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_spectral_filters",
                    "max_position_embeddings", "min_spectral_budget", "gate_hidden_size", "spectral_chunk_size")
        for name in positive:
            check_positive_int(name, getattr(self, name))
        if not 1 <= self.min_spectral_budget <= self.num_spectral_filters:
            raise ValueError(
                f"min_spectral_budget must be in [1, num_spectral_filters={self.num_spectral_filters}], "
                f"got {self.min_spectral_budget}."
            )
        per_layer = self.num_spectral_filters_per_layer
        if per_layer is not None:
            if (not isinstance(per_layer, (list, tuple)) or len(per_layer) != self.num_hidden_layers
                    or any(isinstance(k, bool) or not isinstance(k, int)
                           or not self.min_spectral_budget <= k <= self.num_spectral_filters for k in per_layer)):
                raise ValueError(
                    f"num_spectral_filters_per_layer must be None (K={self.num_spectral_filters} in every layer) or "
                    f"{self.num_hidden_layers} integers (one per layer) in [{self.min_spectral_budget}, "
                    f"{self.num_spectral_filters}] (min_spectral_budget to num_spectral_filters), got {per_layer!r}."
                )
            self.num_spectral_filters_per_layer = list(per_layer)
        if self.spectral_budget is not None:
            budget = check_spectral_budget(self.spectral_budget, self,
                                           "spectral_budget (the model's default budget, None for the full budget)")
            self.spectral_budget = budget
        if self.num_spectral_filters > self.max_position_embeddings:
            raise ValueError(
                f"num_spectral_filters ({self.num_spectral_filters}) cannot exceed "
                f"max_position_embeddings ({self.max_position_embeddings}): the Hankel matrix has only L eigenvectors."
            )
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be None or an integer >= 0, got {self.intermediate_size!r}.")
        if not isinstance(self.local_conv_size, int) or isinstance(self.local_conv_size, bool) or self.local_conv_size < 0:
            raise ValueError(f"local_conv_size must be an integer >= 0 (0: no local convolution), got {self.local_conv_size!r}.")
        if self.input_size is not None and (not isinstance(self.input_size, int) or self.input_size < 1):
            raise ValueError(f"input_size must be None or a positive integer, got {self.input_size!r}.")
        if not isinstance(self.spectral_recompute, bool):
            raise ValueError(f"spectral_recompute must be true or false, got {self.spectral_recompute!r}.")
        saved_mb = self.spectral_saved_mb
        if not is_real_number(saved_mb) or not 0 <= saved_mb < math.inf:
            raise ValueError(f"spectral_saved_mb must be a number of megabytes >= 0 (0: recompute every channel), "
                             f"got {saved_mb!r}.")
        if self.classifier_pooling not in ("mean", "last"):
            raise ValueError(f"classifier_pooling must be 'mean' or 'last', got {self.classifier_pooling!r}.")
        for name, meaning in (("spectral_chunk_mb", "a positive number of megabytes"),
                              ("spectral_proj_multiplier", "a positive number"),
                              ("spectral_proj_init_std", "a positive number"),
                              ("layer_norm_eps", "a positive number"),
                              ("initializer_range", "a positive number")):
            value = getattr(self, name)
            if not is_real_number(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be {meaning}, got {value!r}.")
        gate_bias = self.gate_bias_init
        if not is_real_number(gate_bias) or not math.isfinite(gate_bias):
            raise ValueError(f"gate_bias_init must be a finite number, got {gate_bias!r}.")
        for name in ("embedding_dropout", "hidden_dropout", "drop_path_rate"):
            value = getattr(self, name)
            if not is_real_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")

    @property
    def layer_spectral_filters(self) -> tuple[int, ...]:
        """Each layer's full budget K_l."""
        per_layer = self.num_spectral_filters_per_layer
        return tuple(per_layer) if per_layer is not None else (self.num_spectral_filters,) * self.num_hidden_layers

    def layer_budgets(self, budget: int | list[int]) -> tuple[int, ...]:
        """Each layer's budget under a checked budget (see `check_spectral_budget`): an integer caps every layer."""
        if isinstance(budget, list):
            return tuple(budget)
        return tuple(min(budget, top) for top in self.layer_spectral_filters)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # A saved config without these fields predates them: its weights were trained with these values.
        config_dict = {**FIELDS_BEFORE_THEY_EXISTED, **config_dict}
        loaded = super().from_dict(config_dict, **kwargs)
        # Keyword arguments, such as from_pretrained(path, spectral_budget=4), are set after __init__ validated.
        (loaded[0] if isinstance(loaded, tuple) else loaded)._validate_essm_fields()
        return loaded


__all__ = ["ESSSMConfig", "check_spectral_budget"]
