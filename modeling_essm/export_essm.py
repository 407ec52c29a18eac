"""Export an ES-SSM at one fixed spectral budget (an integer or one per layer): `torch.export` and ONNX.

The model is first sliced to the budget (`slice_to_budget`), so the exported graph carries only the
active channels. Two changes make the graph exportable without changing its result:

- the filter spectrum is precomputed once for an FFT size that covers every length up to L
  (`max_position_embeddings`), so the sequence length can stay dynamic instead of being baked into
  `fft_length(seq_len)`;
- the complex product of the input and filter spectra is written on (real, imaginary) pairs: the
  ONNX exporter converts rFFT / irFFT (the ONNX DFT op) but no other operation on complex tensors.

The convolution is the same linear convolution either way (any FFT size >= 2T is exact), so the
exported forward equals `model(..., spectral_budget=k)` up to float rounding.
"""

from pathlib import Path

import torch
from torch import nn

from .modeling_essm import ESSSMSpectralBasis, ESSSMSpectralMixer


class FixedFilterSpectrum(nn.Module):
    """Stands in for `ESSSMSpectralBasis`: the sigma^(1/4)-scaled filter spectrum as (F, k, 2) real pairs."""

    def __init__(self, basis: ESSSMSpectralBasis, max_length: int):
        super().__init__()
        spectrum = basis.filter_spectrum(max_length, basis.filters.shape[1]).T  # (F, K): every length up to L
        self.register_buffer("spectrum", torch.view_as_real(spectrum).contiguous())

    def filter_spectrum(self, seq_len: int, spectral_budget: int) -> torch.Tensor:
        # The model is sliced to the budget, so each layer's channels are its first ones; one FFT size serves
        # every length.
        return self.spectrum


class RealArithmeticMixer(nn.Module):
    """Runs an `ESSSMSpectralMixer` with the spectral product on (real, imaginary) pairs, then its own `mix`."""

    def __init__(self, mixer: ESSSMSpectralMixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, u: torch.Tensor, filter_spectrum: torch.Tensor, spectral_budget: int, cache_layer=None,
                spectral_basis=None) -> torch.Tensor:
        # The block passes its cache layer along; ESSSMAtBudget never makes a cache, so it is always None here.
        seq_len = u.shape[1]
        n_fft = 2 * (filter_spectrum.shape[0] - 1)
        u_spectrum = torch.view_as_real(torch.fft.rfft(u.float(), n=n_fft, dim=1))  # (B, F, D, 2)
        u_re, u_im = u_spectrum[..., 0].unsqueeze(2), u_spectrum[..., 1].unsqueeze(2)  # (B, F, 1, D)
        filter_spectrum = filter_spectrum[:, :spectral_budget]  # a layer's own channels, when sliced per layer
        f_re, f_im = filter_spectrum[..., 0, None], filter_spectrum[..., 1, None]  # (F, k, 1)
        product = torch.stack([u_re * f_re - u_im * f_im, u_re * f_im + u_im * f_re], dim=-1)  # (B, F, k, D, 2)
        conv = torch.fft.irfft(torch.view_as_complex(product), n=n_fft, dim=1)[:, :seq_len]  # (B, T, k, D)
        return self.mixer.mix(u, conv, spectral_budget)


class ESSSMAtBudget(nn.Module):
    """An exportable copy of `model` fixed at `spectral_budget`; its forward returns the model's first output.

    That is the logits for the causal LM and the classifier, the last hidden state for `ESSSMModel`.
    Pass `input_ids` (or `input_values` for a model built with `input_size`) and optionally `attention_mask`.
    """

    def __init__(self, model, spectral_budget: int | list[int]):
        super().__init__()
        self.model = model.slice_to_budget(spectral_budget).eval()  # validates the budget
        backbone = getattr(self.model, "model", self.model)
        backbone.spectral_basis = FixedFilterSpectrum(backbone.spectral_basis, model.config.max_position_embeddings)
        for block in backbone.layers:
            block.mixer = RealArithmeticMixer(block.mixer)

    def forward(self, input_ids=None, attention_mask=None, input_values=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "input_values": input_values}
        inputs = {name: value for name, value in inputs.items() if value is not None}
        return self.model(**inputs, attention_mask=attention_mask, return_dict=True)[0]


def dynamic_shapes_for(inputs: dict, max_length: int) -> dict:
    """Batch size and sequence length (up to the filter length L) stay free in the exported graph."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq_len", min=1, max=max_length)
    return {name: {0: batch, 1: seq} for name in inputs}


def export_at_budget(model, spectral_budget: int | list[int], **example_inputs) -> torch.export.ExportedProgram:
    """`torch.export` of the forward at `spectral_budget`, with dynamic batch size and sequence length.

    `example_inputs` are the keyword inputs of a typical call, e.g. `input_ids=...` and `attention_mask=...`.
    """
    module = ESSSMAtBudget(model, spectral_budget)
    dynamic_shapes = dynamic_shapes_for(example_inputs, model.config.max_position_embeddings)
    with torch.no_grad():
        return torch.export.export(module, (), kwargs=example_inputs, dynamic_shapes=dynamic_shapes)


def export_onnx(model, spectral_budget: int | list[int], path, **example_inputs) -> Path:
    """Write an ONNX model of the forward at `spectral_budget` to `path`; the inputs keep their names."""
    program = export_at_budget(model, spectral_budget, **example_inputs)  # validates before anything is written
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program = torch.onnx.export(program, kwargs=example_inputs, dynamo=True, output_names=["output"])
    onnx_program.save(str(path))
    return path


__all__ = ["ESSSMAtBudget", "export_at_budget", "export_onnx"]
