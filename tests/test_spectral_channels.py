"""The recomputing operators of the mixer's gated channels against gradcheck, opcheck and plain autograd."""

import math

import pytest
import torch
from conftest import tiny_config

from modeling_essm import ESSSMForCausalLM
from modeling_essm.modeling_essm import ESSSMSpectralMixer, fft_length
from modeling_essm.spectral_channels import (WORKSPACE, gated_channels, gated_channels_backward, gated_spectral_channels,
                                             release_workspace)


def channel_inputs(batch, hidden, seq_len, k, dtype=torch.float32, seed=0):
    """Random inputs of the operators, the filters' spectra at the FFT size the mixer uses."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, hidden, seq_len, generator=generator, dtype=dtype)
    taps = torch.randn(k, seq_len, generator=generator, dtype=dtype)
    weights = torch.softmax(torch.randn(batch, k, seq_len, generator=generator, dtype=dtype), dim=1)
    projections = torch.randn(k, hidden, hidden, generator=generator, dtype=dtype) / hidden**0.5
    return u, torch.fft.rfft(taps, n=fft_length(seq_len)), weights, projections


def plain_channels(u, filter_spectrum, weights, projections):
    """The same sum in plain autograd (the kept path): the inputs' rFFT, then `project_channels`."""
    u_spectrum = torch.fft.rfft(u, n=2 * (filter_spectrum.shape[-1] - 1))
    return ESSSMSpectralMixer.project_channels(u_spectrum, filter_spectrum, weights, projections, u.shape[-1])


@pytest.mark.parametrize("saved", [0, 1, 3])
def test_gradcheck_in_float64(saved):
    u, filter_spectrum, weights, projections = channel_inputs(2, 3, 5, 3, dtype=torch.float64)
    inputs = (u.requires_grad_(), weights.requires_grad_(), projections.requires_grad_())
    # Chunks of 2 over 3 channels: a full chunk and a partial one; none, some or all of the convolutions saved.
    assert torch.autograd.gradcheck(
        lambda u, w, m: gated_spectral_channels(u, filter_spectrum, w, m, 3.0, 2, saved), inputs)


@pytest.mark.parametrize("k, chunk, saved", [(1, 1, 0), (7, 3, 0), (7, 3, 4), (7, 7, 7), (16, 5, 0), (16, 5, 11)])
def test_outputs_and_gradients_match_plain_autograd(k, chunk, saved):
    seq_len = 97  # not 5-smooth: the FFT size is larger than 2T
    fast_inputs = channel_inputs(2, 32, seq_len, k)
    plain_inputs = [x.clone() for x in fast_inputs]
    for inputs in (fast_inputs, plain_inputs):
        for index in (0, 2, 3):  # every input but the fixed filters
            inputs[index].requires_grad_()
    probe = torch.randn(2, 32, seq_len, generator=torch.Generator().manual_seed(5))
    fast = gated_spectral_channels(*fast_inputs, 3.0, chunk, saved)  # the stored M_j and their multiplier
    u, filter_spectrum, weights, projections = plain_inputs
    plain = plain_channels(u, filter_spectrum, weights, 3.0 * projections)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    (fast * probe).sum().backward()
    (plain * probe).sum().backward()
    for name, index in (("u", 0), ("weights", 2), ("projections", 3)):
        expected = plain_inputs[index].grad
        scale = expected.abs().max()
        torch.testing.assert_close(fast_inputs[index].grad / scale, expected / scale, atol=1e-5, rtol=1e-4, msg=name)


def test_inputs_with_time_strided_give_a_contiguous_output_and_the_same_result():
    """u as a transposed (B, T, D) view: the output is still the (B, D, T) tensor that the GEMMs write in place."""
    u, filter_spectrum, weights, projections = channel_inputs(2, 8, 12, 5)
    strided = u.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, time strided by D
    contiguous = u.clone().requires_grad_()
    out_strided = gated_spectral_channels(strided, filter_spectrum, weights, projections, 2.0, 2, 2)
    out = gated_spectral_channels(contiguous, filter_spectrum, weights, projections, 2.0, 2, 2)
    assert not strided.is_contiguous() and out_strided.is_contiguous()
    torch.testing.assert_close(out_strided, out, atol=0, rtol=0)
    probe = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(3))
    (out_strided * probe).sum().backward()
    (out * probe).sum().backward()
    torch.testing.assert_close(strided.grad, contiguous.grad, atol=0, rtol=0)


def test_gate_weights_of_zero_get_a_zero_gradient_and_the_rest_match_plain_autograd():
    """The gate's gradient is read from the gated convolutions divided by the weights: where a weight is 0 it comes
    back 0, not NaN (a softmax's input gradient does not depend on it there), and the others are unchanged."""
    fast_inputs = channel_inputs(2, 8, 12, 5)
    fast_inputs[2][0, 1, :4] = 0.0  # saved channel 1 and recomputed channel 3 of the first sequence
    fast_inputs[2][1, 3, 7:] = 0.0
    plain_inputs = [x.clone() for x in fast_inputs]
    for inputs in (fast_inputs, plain_inputs):
        for index in (0, 2, 3):
            inputs[index].requires_grad_()
    probe = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(7))
    (gated_spectral_channels(*fast_inputs, 2.0, 2, 2) * probe).sum().backward()
    u, filter_spectrum, weights, projections = plain_inputs
    (plain_channels(u, filter_spectrum, weights, 2.0 * projections) * probe).sum().backward()
    zero = fast_inputs[2].detach() == 0
    assert torch.equal(fast_inputs[2].grad[zero], torch.zeros(int(zero.sum())))
    expected = plain_inputs[2].grad.masked_fill(zero, 0.0)
    torch.testing.assert_close(fast_inputs[2].grad, expected, atol=1e-5, rtol=1e-4)
    for index in (0, 3):
        torch.testing.assert_close(fast_inputs[index].grad, plain_inputs[index].grad, atol=1e-5, rtol=1e-4)


def test_the_mixers_gate_keeps_every_weight_a_normal_float():
    """Where the division above is exact: after the RMS rescale a weight is at least exp(-sqrt(2k)) / k (a normal
    float32 for k up to about 3,000), even for two logits driven as far apart as they go."""
    for k in (2, 32, 2048):
        mixer = ESSSMSpectralMixer(tiny_config(num_spectral_filters=k, max_position_embeddings=k), 0)
        with torch.no_grad():
            mixer.gate_out.weight.zero_()
            mixer.gate_out.bias.copy_(torch.cat([torch.tensor([1e4, -1e4]), torch.zeros(k - 2)]))
        weights = mixer.gate(torch.randn(1, 3, mixer.skip_proj.in_features), k)
        floor = math.exp(-math.sqrt(2 * k)) / k
        assert weights.min() >= max(floor * (1 - 1e-4), torch.finfo(torch.float32).tiny), k


def test_projections_above_the_budget_get_an_exact_zero_gradient():
    u, filter_spectrum, weights, projections = channel_inputs(2, 8, 12, 5)
    k = 3
    whole = projections.clone().requires_grad_()
    sliced = projections.clone().requires_grad_()
    probe = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(3))
    torch.use_deterministic_algorithms(True)  # which fills uninitialised memory with NaN: an unwritten row shows
    try:
        for projections_in in (whole, sliced[:k]):
            out = gated_spectral_channels(u, filter_spectrum[:k], weights[:, :k], projections_in, 2.0, 2)
            (out * probe).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(whole.grad[:k], sliced.grad[:k], atol=0, rtol=0)
    assert torch.equal(whole.grad[k:], torch.zeros_like(whole.grad[k:]))


def test_operators_pass_opcheck():
    """Schema, autograd registration, fake tensors (shapes and strides, a permuted gate included) and AOT dispatch."""
    u, filter_spectrum, weights, projections = channel_inputs(2, 8, 12, 5)
    settings = (2.0, 2, torch.float32)  # multiplier, chunk, GEMM dtype
    inputs = (u.requires_grad_(), filter_spectrum, weights.requires_grad_(), projections.requires_grad_())
    for saved in (0, 3):
        torch.library.opcheck(gated_channels, (*inputs, 2.0, 2, saved, torch.float32))
    _, saved_features, u_spectrum = gated_channels(*inputs, 2.0, 2, 3, torch.float32)  # (2, 3, 8, 12), (2, 8, F)
    torch.testing.assert_close(u_spectrum, torch.fft.rfft(u.detach(), n=fft_length(12)))
    grad_out = torch.randn(2, 8, 12)
    permuted_gate = weights.detach().transpose(1, 2).contiguous().transpose(1, 2)
    for gate, saved, wanted in ((weights.detach(), saved_features[:, :0], (True, True, True)),
                                (weights.detach(), saved_features, (True, True, True)),
                                (permuted_gate, saved_features, (True, True, True)),
                                (weights.detach(), saved_features, (True, False, False)),
                                (weights.detach(), saved_features[:, :0], (False, True, False))):
        torch.library.opcheck(gated_channels_backward, (grad_out, u_spectrum.detach(), filter_spectrum, gate,
                                                        projections.detach(), saved, *settings, *wanted))


def test_saved_convolutions_are_not_recomputed_and_give_identical_gradients(monkeypatch):
    """Backward reads the first `saved` channels' convolutions from forward: k + (k - saved) convolutions in all."""
    import modeling_essm.spectral_channels as spectral_channels

    convolve, calls = spectral_channels.channel_convolution, []
    monkeypatch.setattr(spectral_channels, "channel_convolution", lambda *a: calls.append(1) or convolve(*a))
    probe = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(6))
    grads = {}
    for saved in (0, 2, 5, 9):  # 9 > k: all of them
        inputs = channel_inputs(2, 8, 12, 5)
        for index in (0, 2, 3):
            inputs[index].requires_grad_()
        calls.clear()
        (gated_spectral_channels(*inputs, 2.0, 2, saved) * probe).sum().backward()
        assert len(calls) == 5 + 5 - min(saved, 5), saved
        grads[saved] = [inputs[index].grad for index in (0, 2, 3)]
    for saved in (2, 5, 9):
        for grad, expected in zip(grads[saved], grads[0]):
            torch.testing.assert_close(grad, expected, atol=0, rtol=0)


@pytest.mark.parametrize("trained", [("u", "weights"), ("u",), ("weights", "projections"), ("projections",)])
def test_frozen_inputs_get_no_gradient_and_the_others_the_same(trained):
    """Backward computes only the gradients asked for: a frozen spectral_proj (LoRA elsewhere) or gate."""
    names = ("u", "filter_spectrum", "weights", "projections")
    everything = dict(zip(names, channel_inputs(2, 8, 12, 5)))
    some = {name: x.clone() for name, x in everything.items()}
    for name in ("u", "weights", "projections"):
        everything[name].requires_grad_()
        some[name].requires_grad_(name in trained)
    probe = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(4))
    for inputs in (everything, some):
        (gated_spectral_channels(*inputs.values(), 2.0, 2, 2) * probe).sum().backward()  # 2 of 5 saved
    for name in ("u", "weights", "projections"):
        if name in trained:
            torch.testing.assert_close(some[name].grad, everything[name].grad, atol=0, rtol=0, msg=name)
        else:
            assert some[name].grad is None, name


def test_nothing_is_saved_when_neither_the_gate_nor_the_projections_need_a_gradient(monkeypatch):
    """The saved convolutions serve only those two gradients: with both frozen, or at inference, forward keeps none."""
    import modeling_essm.spectral_channels as spectral_channels

    forward, saved = spectral_channels.gated_channels, []
    monkeypatch.setattr(spectral_channels, "gated_channels", lambda *inputs: saved.append(inputs[6]) or forward(*inputs))
    u, filter_spectrum, weights, projections = channel_inputs(2, 8, 12, 5)
    gated_spectral_channels(u.requires_grad_(), filter_spectrum, weights, projections, 2.0, 2, 3)
    gated_spectral_channels(u, filter_spectrum, weights, projections.requires_grad_(), 2.0, 2, 3)
    with torch.no_grad():
        gated_spectral_channels(u, filter_spectrum, weights, projections, 2.0, 2, 3)
    assert saved == [0, 3, 0]


def test_buffers_made_at_inference_serve_training_and_inference_alike():
    """Inference runs the forward operator too; the buffers it makes under inference mode must stay writable."""
    release_workspace()
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(spectral_recompute=True))
    x = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(x).logits
    model(x, labels=x).loss.backward()  # raised "Inplace update to inference tensor" on buffers made above
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    release_workspace()


def test_blocks_of_the_batch_give_the_same_outputs_and_gradients(monkeypatch):
    """The operators run on a few sequences at a time (FFT_BLOCK_BYTES), each block with its own saved channels."""
    import modeling_essm.spectral_channels as spectral_channels

    def run():
        u, filter_spectrum, weights, projections = channel_inputs(3, 8, 12, 5)
        inputs = [u.requires_grad_(), weights.requires_grad_(), projections.requires_grad_()]
        out = gated_spectral_channels(inputs[0], filter_spectrum, inputs[1], inputs[2], 2.0, 2, 2)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out.detach()] + [x.grad for x in inputs]

    whole = run()
    blocks, convolution = [], spectral_channels.channel_convolution
    monkeypatch.setattr(spectral_channels, "channel_convolution",
                        lambda u_spectrum, *rest: blocks.append(u_spectrum.shape[0]) or convolution(u_spectrum, *rest))
    monkeypatch.setattr(spectral_channels, "FFT_BLOCK_BYTES", 2 * 8 * fft_length(12) * 4)  # two sequences
    for blocked, expected in zip(run(), whole):
        torch.testing.assert_close(blocked, expected, atol=1e-6, rtol=1e-6)
    # Forward: 5 channels of the block of 2 sequences, then of the block of 1; backward recomputes each block's 3
    # unsaved ones (the blocks in the order autograd takes them).
    assert blocks[:10] == [2] * 5 + [1] * 5 and sorted(blocks[10:]) == [1] * 3 + [2] * 3


def test_mismatched_gate_projections_or_filter_spectra_are_refused_before_any_work():
    u, filter_spectrum, weights, projections = channel_inputs(1, 4, 8, 3)
    with pytest.raises(ValueError, match="3 filters need 3 gate weights per token \\(got 2\\)"):
        gated_spectral_channels(u, filter_spectrum, weights[:, :2], projections, 1.0, 1)
    with pytest.raises(ValueError, match="at least 3 projections \\(got 2\\)"):
        gated_spectral_channels(u, filter_spectrum, weights, projections[:2], 1.0, 1)
    short_spectrum = torch.fft.rfft(torch.randn(3, 8), n=14)  # 14 < 2T - 1 = 15: the last output would wrap around
    with pytest.raises(ValueError, match="8 steps need filter spectra at an FFT size of at least 15 .* got 14"):
        gated_spectral_channels(u, short_spectrum, weights, projections, 1.0, 1)
    gated_spectral_channels(u, torch.fft.rfft(torch.randn(3, 8), n=16), weights, projections, 1.0, 1)  # 16 is enough


def test_training_steps_reuse_one_set_of_buffers_and_return_gradients_that_do_not_alias_them():
    release_workspace()
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(spectral_recompute=True)).train()  # two layers share the buffers
    x = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))

    def step(inputs):
        model.zero_grad(set_to_none=True)
        model(inputs, labels=inputs).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    first = step(x)
    buffers = {key: flat.data_ptr() for key, flat in WORKSPACE.buffers.items()}
    assert {name for name, _, _ in buffers} == {"features", "grad_features", "gate_terms", "spectrum", "padded"}
    spectral_grad = model.model.layers[0].mixer.spectral_proj.grad
    held = spectral_grad.clone()
    step(x.flip(0))  # different data through the same buffers
    assert {key: flat.data_ptr() for key, flat in WORKSPACE.buffers.items()} == buffers
    assert torch.equal(spectral_grad, held)  # the earlier step's gradient is its own tensor
    again = step(x)
    for name, grad in first.items():
        torch.testing.assert_close(again[name], grad, atol=0, rtol=0, msg=name)
    release_workspace()
    assert not WORKSPACE.buffers


def test_trainable_filters_are_refused():
    u, filter_spectrum, weights, projections = channel_inputs(1, 4, 8, 2)
    with pytest.raises(ValueError, match="filter_spectrum must not require grad"):
        gated_spectral_channels(u, filter_spectrum.requires_grad_(), weights, projections, 1.0, 1)
