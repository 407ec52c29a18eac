import json
import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.testing import EagerAndRecordGraphs
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_essm import ESSSMConfig, ESSSMForCausalLM, ESSSMForSequenceClassification, ESSSMModel
from modeling_essm.budget import default_budget_grid
from modeling_essm.modeling_essm import ESSSMSpectralMixer, fft_length
from modeling_essm.cache_essm import ESSSMCacheLayer
from modeling_essm.naive import naive_mixer
from modeling_essm.spectral_channels import gated_channels, gated_spectral_channels

K = 16  # num_spectral_filters of tiny_config


def tokens(batch=2, seq_len=40, seed=0):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# --- the spectral mixer against its definition ----------------------------------------------------------


@pytest.mark.parametrize("k", [2, 7, K])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("local_conv_size", [0, 1, 4])
def test_mixer_matches_direct_convolution_reference(k, grad, local_conv_size):
    torch.manual_seed(0)
    causal_lm = ESSSMForCausalLM(tiny_config(local_conv_size=local_conv_size))
    basis = causal_lm.model.spectral_basis
    mixer = causal_lm.model.layers[0].mixer
    if local_conv_size:
        torch.nn.init.normal_(mixer.local_conv.bias)  # zero at initialisation: make it count
    u = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):  # grad enabled: one chunk; disabled: chunks of 3 channels
        y = mixer(u, basis.filter_spectrum(37, k), k)
    expected = naive_mixer(mixer, u, basis.filters, basis.eigenvalues, k)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("future_fill", [True, False], ids=["future_fill", "naive_cache"])
def test_cached_mixer_steps_match_the_reference(future_fill):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config())
    basis, mixer, k = model.model.spectral_basis, model.model.layers[0].mixer, 7
    u = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(2))
    cache_layer = ESSSMCacheLayer(model.config, future_fill=future_fill)
    with torch.no_grad():
        outputs = [mixer(u[:, :9], basis.filter_spectrum(9, k), k, cache_layer=cache_layer, spectral_basis=basis)]
        for start, stop in [(9, 10), (10, 13), *((t, t + 1) for t in range(13, 30))]:  # a draft-sized chunk too
            outputs.append(mixer(u[:, start:stop], None, k, cache_layer=cache_layer, spectral_basis=basis))
    expected = naive_mixer(mixer, u, basis.filters, basis.eigenvalues, k)
    torch.testing.assert_close(torch.cat(outputs, 1).double(), expected, atol=1e-5, rtol=1e-4)


def test_fft_length_is_even_smooth_and_long_enough():
    for n in [1, 7, 37, 97, 1000, 4096, 8191]:
        size = fft_length(n)
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1 and size % 2 == 0 and size >= 2 * n
    assert fft_length(4096) == 8192


def test_gate_weights_are_a_distribution_over_the_active_channels(causal_lm):
    mixer = causal_lm.model.layers[1].mixer
    u = torch.randn(3, 20, 32)
    for k in [2, 5, K]:
        weights = mixer.gate(u, k)
        assert weights.shape == (3, 20, k) and weights.dtype == torch.float32
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 20))


# --- causality, budgets, slicing ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 8, K])
def test_outputs_are_causal(causal_lm, k):
    x = tokens(seq_len=50)
    changed = x.clone()
    changed[:, 30:] = (changed[:, 30:] + 17) % 256
    a = causal_lm(x, spectral_budget=k).logits
    b = causal_lm(changed, spectral_budget=k).logits
    torch.testing.assert_close(a[:, :30], b[:, :30], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_outputs_differ_across_budgets(causal_lm):
    x = tokens()
    logits = [causal_lm(x, spectral_budget=k).logits for k in (2, 4, 8, K)]
    for i in range(len(logits) - 1):
        assert (logits[i] - logits[i + 1]).abs().max() > 1e-4


def test_none_means_full_budget(causal_lm):
    x = tokens()
    assert torch.equal(causal_lm(x).logits, causal_lm(x, spectral_budget=K).logits)


@pytest.mark.parametrize("model_class", [ESSSMForCausalLM, ESSSMForSequenceClassification, ESSSMModel])
@pytest.mark.parametrize("k", [2, 5, K])
def test_slice_to_budget_equals_the_budgeted_forward(config, model_class, k):
    torch.manual_seed(0)
    model = model_class(config).eval()
    small = model.slice_to_budget(k)
    assert type(small) is model_class and small.config.num_spectral_filters == k
    assert model.config.num_spectral_filters == K  # the original is untouched
    x = tokens()
    expected = model(x, spectral_budget=k)[0]
    torch.testing.assert_close(small(x)[0], expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) or k == K


@pytest.mark.parametrize("budget", [2, 5, K, [2, K]])
def test_parameters_at_a_budget_are_those_of_the_slice(config, budget):
    model = ESSSMForCausalLM(config)
    assert model.num_parameters_at_budget(budget) == model.slice_to_budget(budget).num_parameters()
    assert model.num_parameters_at_budget(budget) < model.num_parameters() or budget == K


def test_sliced_model_saves_a_smaller_checkpoint(causal_lm, tmp_path):
    causal_lm.save_pretrained(tmp_path / "full")
    causal_lm.slice_to_budget(4).save_pretrained(tmp_path / "k4")
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    small = (tmp_path / "k4" / "model.safetensors").stat().st_size
    assert small < 0.6 * full
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "k4")
    assert reloaded.config.num_spectral_filters == 4
    x = tokens()
    torch.testing.assert_close(reloaded(x).logits, causal_lm(x, spectral_budget=4).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 8])
def test_channels_above_the_budget_get_exactly_zero_gradient(config, k):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(config).train()
    x = tokens()
    model(x, labels=x, spectral_budget=k).loss.backward()
    for block in model.model.layers:
        mixer = block.mixer
        assert torch.count_nonzero(mixer.spectral_proj.grad[k:]) == 0
        assert torch.count_nonzero(mixer.gate_out.weight.grad[k:]) == 0
        assert torch.count_nonzero(mixer.gate_out.bias.grad[k:]) == 0
        assert mixer.spectral_proj.grad[:k].abs().sum() > 0
        assert mixer.gate_out.weight.grad[:k].abs().sum() > 0


def test_concurrent_calls_with_different_budgets_do_not_interfere(causal_lm):
    x = tokens()
    expected = {k: causal_lm(x, spectral_budget=k).logits for k in (2, 8, K)}
    results, errors = {}, []

    def run(k):
        try:
            for _ in range(5):
                results.setdefault(k, []).append(causal_lm(x, spectral_budget=k).logits)
        except Exception as error:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for k, outputs in results.items():
        for logits in outputs:
            torch.testing.assert_close(logits, expected[k], atol=1e-6, rtol=0)


# --- padding and batching -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, K])
def test_left_padded_rows_equal_unpadded_rows(causal_lm, k):
    short, long = tokens(1, 23, seed=1), tokens(1, 40, seed=2)
    pad = causal_lm.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 17), pad), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 17), torch.ones(1, 23)], dim=1), torch.ones(1, 40)]).long()
    padded = causal_lm(batch, attention_mask=mask, spectral_budget=k).logits
    torch.testing.assert_close(padded[0, 17:], causal_lm(short, spectral_budget=k).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], causal_lm(long, spectral_budget=k).logits[0], atol=1e-5, rtol=1e-5)


def test_batch_equals_rows_one_by_one(causal_lm):
    x = tokens(batch=4, seq_len=33)
    batched = causal_lm(x, spectral_budget=6).logits
    for i in range(4):
        torch.testing.assert_close(batched[i], causal_lm(x[i : i + 1], spectral_budget=6).logits[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classification_pooling_ignores_padding(pooling):
    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(num_labels=3, classifier_pooling=pooling)).eval()
    short, long = tokens(1, 20, seed=3), tokens(1, 31, seed=4)
    pad = model.config.pad_token_id
    left = torch.cat([torch.full((1, 11), pad), short], dim=1)
    right = torch.cat([short, torch.full((1, 11), pad)], dim=1)
    mask_left = torch.cat([torch.zeros(1, 11), torch.ones(1, 20)], dim=1).long()
    mask_right = mask_left.flip(1)
    alone = model(short, spectral_budget=4).logits
    torch.testing.assert_close(model(torch.cat([left, long]), attention_mask=torch.cat([mask_left, torch.ones(1, 31,
                               dtype=torch.long)]), spectral_budget=4).logits[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(right, attention_mask=mask_right, spectral_budget=4).logits, alone,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "num_labels, labels, problem_type",
    [(3, torch.tensor([0, 2]), "single_label_classification"),
     (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
     (1, torch.tensor([0.5, -1.0]), "regression")],
)
def test_classification_losses(num_labels, labels, problem_type):
    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(num_labels=num_labels))
    out = model(tokens(), labels=labels, spectral_budget=3)
    assert model.config.problem_type == problem_type
    assert out.logits.shape == (2, num_labels) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_real_valued_inputs_through_the_input_projection():
    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(input_size=1, num_labels=10)).eval()
    audio = torch.randn(2, 100)
    logits = model(input_values=audio, spectral_budget=4).logits
    torch.testing.assert_close(logits, model(input_values=audio.unsqueeze(-1), spectral_budget=4).logits)
    with pytest.raises(ValueError, match="input_values"):
        model(input_ids=tokens())
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len, 1\)"):
        model(input_values=torch.randn(2, 100, 3))


def test_inputs_embeds_equal_input_ids(causal_lm):
    x = tokens()
    embeds = causal_lm.get_input_embeddings()(x)
    torch.testing.assert_close(causal_lm(inputs_embeds=embeds, spectral_budget=4).logits,
                               causal_lm(x, spectral_budget=4).logits)
    with pytest.raises(ValueError, match="exactly one"):
        causal_lm(x, inputs_embeds=embeds)


def test_hidden_states_logits_to_keep_and_tuple_output(causal_lm):
    x = tokens()
    out = causal_lm(x, output_hidden_states=True, logits_to_keep=1)
    assert len(out.hidden_states) == causal_lm.config.num_hidden_layers + 1
    assert out.logits.shape == (2, 1, 259)
    torch.testing.assert_close(out.logits[:, 0], causal_lm(x).logits[:, -1])
    assert isinstance(causal_lm(x, return_dict=False), tuple)


def test_tied_head(causal_lm):
    assert causal_lm.lm_head.weight.data_ptr() == causal_lm.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_gives_the_same_gradients(config):
    x = tokens()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ESSSMForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(x, labels=x, spectral_budget=5).loss.backward()
        grads.append(model.model.layers[0].mixer.spectral_proj.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_dropout_and_drop_path_only_act_in_training():
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(hidden_dropout=0.3, drop_path_rate=0.5))
    x = tokens()
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_embedding_dropout_acts_on_the_embeddings_in_training_only():
    torch.manual_seed(0)
    model = ESSSMModel(tiny_config(embedding_dropout=0.5))
    torch.manual_seed(0)
    plain = ESSSMModel(tiny_config())
    x = tokens()
    model.eval(), plain.eval()
    assert torch.equal(model(x).last_hidden_state, plain(x).last_hidden_state)
    model.train()
    embeddings = model(x, output_hidden_states=True).hidden_states[0]  # the first block's input
    assert 0.4 < (embeddings == 0).float().mean() < 0.6  # about half the entries dropped, the rest scaled by 2
    kept = embeddings != 0
    torch.testing.assert_close(embeddings[kept], 2 * model.embed_tokens(x)[kept])


# --- the spectral projection multiplier ------------------------------------------------------------------


def test_projection_multiplier_defaults_and_paper_init():
    config = ESSSMConfig()
    assert (config.spectral_proj_multiplier, config.spectral_proj_init_std, config.embedding_dropout) == (100.0, 1e-3, 0.0)
    torch.manual_seed(0)
    model = ESSSMModel(ESSSMConfig(hidden_size=128, num_hidden_layers=1, max_position_embeddings=64))
    mixer = model.layers[0].mixer
    assert mixer.spectral_proj.std().item() == pytest.approx(1e-3 / 100, rel=0.02)  # stored
    assert mixer.projections(0, 32).std().item() == pytest.approx(1e-3, rel=0.02)  # what the forward uses


def test_the_function_at_initialisation_does_not_depend_on_the_multiplier():
    x = tokens()
    logits = []
    for multiplier in (1.0, 100.0):
        torch.manual_seed(0)
        model = ESSSMForCausalLM(tiny_config(spectral_proj_multiplier=multiplier)).eval()
        logits.append(model(x).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiplier", [1.0, 100.0])
def test_an_adam_step_moves_the_effective_projections_by_the_multiplier_times_lr(multiplier):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(spectral_proj_multiplier=multiplier))
    mixer = model.model.layers[0].mixer
    before = mixer.projections(0, K).detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model(tokens(), labels=tokens()).loss.backward()
    optimizer.step()
    moved = (mixer.projections(0, K).detach() - before).abs()
    # Adam's first step moves every entry with a gradient by lr (sign of the gradient): the forward sees c * lr.
    assert moved.max().item() == pytest.approx(multiplier * 1e-4, rel=1e-3)


def test_a_config_saved_before_the_multiplier_existed_loads_with_its_trained_behaviour(tmp_path):
    torch.manual_seed(0)
    old = ESSSMForCausalLM(tiny_config(spectral_proj_multiplier=1.0, spectral_proj_init_std=0.02, local_conv_size=0)).eval()
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("spectral_proj_multiplier", "spectral_proj_init_std", "embedding_dropout", "local_conv_size"):
        del saved[field]  # as written before these fields existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.spectral_proj_multiplier, reloaded.config.local_conv_size) == (1.0, 0)
    x = tokens()
    assert torch.equal(reloaded(x).logits, old(x).logits)


def test_new_fields_are_saved_and_reloaded(tmp_path):
    config = tiny_config(spectral_proj_multiplier=30.0, spectral_proj_init_std=5e-3, embedding_dropout=0.1, local_conv_size=3)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert (reloaded.spectral_proj_multiplier, reloaded.spectral_proj_init_std, reloaded.embedding_dropout,
            reloaded.local_conv_size) == (30.0, 5e-3, 0.1, 3)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, K + 1, -3, 2.5, True, "8", torch.tensor([2, 3, 4]), torch.tensor(4.0)])
def test_bad_budgets_name_the_valid_range(causal_lm, budget):
    with pytest.raises(ValueError, match=rf"\[2, {K}\]"):
        causal_lm(tokens(), spectral_budget=budget)
    with pytest.raises(ValueError, match=rf"\[2, {K}\]"):
        causal_lm.slice_to_budget(budget)


def test_integer_tensor_budgets_are_accepted(causal_lm):
    x = tokens()
    torch.testing.assert_close(causal_lm(x, spectral_budget=torch.tensor(4)).logits,
                               causal_lm(x, spectral_budget=4).logits)


def test_overlong_sequence_names_both_lengths_and_the_field(causal_lm):
    with pytest.raises(ValueError, match=r"129 exceeds max_position_embeddings=128"):
        causal_lm(tokens(seq_len=129))


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(min_spectral_budget=17), r"min_spectral_budget must be in \[1, num_spectral_filters=16\]"),
     (dict(num_spectral_filters=200), "cannot exceed max_position_embeddings"),
     (dict(hidden_size=0), "hidden_size must be a positive integer"),
     (dict(classifier_pooling="max"), "classifier_pooling"),
     (dict(hidden_dropout=1.5), "hidden_dropout"),
     (dict(spectral_chunk_mb=0), "spectral_chunk_mb must be a positive number of megabytes, got 0"),
     (dict(spectral_proj_multiplier=-1.0), "spectral_proj_multiplier must be a positive number, got -1.0"),
     (dict(spectral_proj_init_std=True), "spectral_proj_init_std must be a positive number, got True"),
     (dict(embedding_dropout="0.1"), r"embedding_dropout must be a number in \[0, 1\), got '0.1'"),
     (dict(local_conv_size=-1), r"local_conv_size must be an integer >= 0 \(0: no local convolution\), got -1"),
     (dict(local_conv_size=2.0), "local_conv_size must be an integer >= 0"),
     (dict(hidden_size="big"), "hidden_size must be a positive integer, got 'big'"),
     (dict(layer_norm_eps=0), "layer_norm_eps must be a positive number, got 0"),
     (dict(initializer_range="0.02"), "initializer_range must be a positive number"),
     (dict(gate_bias_init=float("nan")), "gate_bias_init must be a finite number, got nan"),
     (dict(spectral_recompute="yes"), "spectral_recompute must be true or false, got 'yes'"),
     (dict(spectral_saved_mb=-1), r"spectral_saved_mb must be a number of megabytes >= 0 \(0: recompute every channel\), got -1"),
     (dict(spectral_saved_mb="32"), "spectral_saved_mb must be a number of megabytes >= 0"),
     (dict(spectral_saved_mb=float("inf")), "spectral_saved_mb must be a number of megabytes >= 0"),
     (dict(spectral_saved_mb=True), "spectral_saved_mb must be a number of megabytes >= 0 .*, got True")],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_a_misspelled_field_warns_with_the_field_it_probably_meant():
    with pytest.warns(UserWarning, match="unknown field 'hiden_size': did you mean 'hidden_size'"):
        config = tiny_config(hiden_size=4)
    assert config.hidden_size == 32  # kept aside, as transformers keeps extra keys, not applied


@pytest.mark.parametrize("empty", ["torch-meta-device", "accelerate-init-empty-weights"])
def test_a_model_built_without_memory_gets_the_ordinary_basis_when_initialised(empty):
    ordinary = ESSSMForCausalLM(tiny_config()).model.spectral_basis
    if empty == "torch-meta-device":
        with torch.device("meta"):
            model = ESSSMForCausalLM(tiny_config())
    else:
        accelerate = pytest.importorskip("accelerate")
        with accelerate.init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(tiny_config())
    assert model.model.spectral_basis.filters.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    basis = model.model.spectral_basis
    assert torch.equal(basis.filters, ordinary.filters) and torch.equal(basis.eigenvalues, ordinary.eigenvalues)


def test_fields_kept_in_float32_are_float32_under_another_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = ESSSMForCausalLM(tiny_config())
    finally:
        torch.set_default_dtype(default)
    basis, mixer = model.model.spectral_basis, model.model.layers[0].mixer
    assert basis.filters.dtype == basis.eigenvalues.dtype == torch.float32
    assert mixer.gate_in.weight.dtype == mixer.spectral_proj.dtype == torch.bfloat16


# --- save, load, remote code ----------------------------------------------------------------------------


def test_save_load_is_bitwise_identical(causal_lm, tmp_path):
    causal_lm.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens()
    for k in (2, 8, None):
        assert torch.equal(reloaded(x, spectral_budget=k).logits, causal_lm(x, spectral_budget=k).logits)


def test_filters_come_from_the_checkpoint_and_are_never_recomputed(causal_lm, tmp_path):
    basis = causal_lm.model.spectral_basis
    with torch.no_grad():
        basis.filters[:, 5].neg_()  # a sign flip: what a recomputation could silently do
    causal_lm.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.model.spectral_basis.filters, basis.filters)


def test_loading_in_bfloat16_keeps_only_the_filters_in_float32_and_stays_close(causal_lm, tmp_path):
    causal_lm.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == model.model.layers[0].mixer.spectral_proj.dtype == torch.bfloat16
    assert model.model.spectral_basis.filters.dtype == model.model.spectral_basis.eigenvalues.dtype == torch.float32
    x = tokens()
    logits, reference = model(x, spectral_budget=4).logits, causal_lm(x, spectral_budget=4).logits
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_bf16_autocast_is_finite_and_close_to_float32(causal_lm):
    x = tokens(seq_len=100)
    reference = causal_lm(x, spectral_budget=8).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = causal_lm(x, spectral_budget=8).logits
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def compile_across_the_grid(model, run, backend):
    """Compile `model` whole (fullgraph: a graph break raises) and call `run(module, k)` at every grid budget.

    Returns the compiled and eager results per budget and the number of graphs compiled for all of them.
    """
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    budgets = default_budget_grid(model.config.num_spectral_filters)
    results = {k: (run(compiled, k), run(model, k)) for k in budgets}
    return results, counters["stats"]["unique_graphs"]


def test_inference_chunks_keep_the_convolution_output_within_spectral_chunk_mb():
    mixer = ESSSMSpectralMixer(tiny_config(hidden_size=256, spectral_chunk_size=8))  # 64 MB by default
    # (batch, n_fft) -> channels: 8 MB per channel at L=4096, 32 MB at L=16384, 64 MB at L=32768.
    chunks = {(1, 2048): 8, (1, 8192): 8, (1, 32768): 2, (1, 65536): 1, (4, 8192): 2}
    assert {shape: mixer.channels_per_chunk(shape[0], 256, shape[1], mixer.chunk_bytes) for shape in chunks} == chunks


def test_memory_bounded_chunks_give_the_same_outputs(causal_lm):
    one_channel_chunks = ESSSMForCausalLM(tiny_config(spectral_chunk_mb=1e-6)).eval()
    one_channel_chunks.load_state_dict(causal_lm.state_dict())
    mixer = one_channel_chunks.model.layers[0].mixer
    assert mixer.channels_per_chunk(2, 32, 256, mixer.chunk_bytes) == 1
    x = tokens(seq_len=100)
    with torch.no_grad():
        for k in (2, 7, K):
            torch.testing.assert_close(one_channel_chunks(x, spectral_budget=k).logits,
                                       causal_lm(x, spectral_budget=k).logits)


def test_torch_compile_has_no_graph_breaks_and_few_graphs_across_budgets():
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(spectral_chunk_size=4)).eval()  # K=16: 1 to 4 chunks
    x = tokens(seq_len=48)
    with torch.no_grad():
        results, graphs = compile_across_the_grid(model, lambda m, k: m(x, spectral_budget=k).logits, "eager")
    for k, (compiled, eager) in results.items():
        torch.testing.assert_close(compiled, eager, msg=f"budget {k}")
    # One graph for the first budget, then at most one per number of chunks: not one per budget.
    assert graphs <= 1 + math.ceil(K / 4) < len(results)


@pytest.mark.parametrize("recompute", [True, False], ids=["recomputed", "kept"])
def test_torch_compile_training_step_matches_eager(recompute):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(hidden_dropout=0.0, spectral_recompute=recompute)).train()
    x = tokens(seq_len=48)

    def loss_and_grad(module, k):
        model.zero_grad(set_to_none=True)
        loss = module(x, labels=x, spectral_budget=k).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].mixer.spectral_proj.grad.clone()

    results, graphs = compile_across_the_grid(model, loss_and_grad, "aot_eager")
    for k, (compiled, eager) in results.items():
        torch.testing.assert_close(compiled, eager, msg=f"budget {k}")
    # Either way the budget becomes a dynamic shape after the first graph: the operators take it as one, and compiled
    # kept training runs one chunk.
    assert graphs <= 3 < len(results)


def test_compiled_training_recomputes_through_the_custom_operator():
    model = ESSSMForCausalLM(tiny_config(spectral_recompute=True)).train()
    x = tokens(seq_len=48)
    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    torch.compile(model, backend=backend, fullgraph=True)(x, labels=x, spectral_budget=7).loss.backward()
    called = {node.target for graph in backend.graphs for node in graph.graph.nodes}
    assert gated_channels._opoverload in called  # inside the graph: no break, and no plain autograd fallback


def test_compiled_training_under_bf16_autocast_matches_eager():
    # The autocast dtype is read where torch.compile sees it and handed to the operators as an argument.
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config(hidden_dropout=0.0, spectral_recompute=True)).train()
    x = tokens(seq_len=48)

    def loss_and_grad(module):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(x, labels=x, spectral_budget=7).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].mixer.spectral_proj.grad.clone()

    torch._dynamo.reset()
    compiled = loss_and_grad(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, loss_and_grad(model))


def test_auto_classes_resolve_to_essm(config, tmp_path):
    assert isinstance(AutoConfig.for_model("essm"), ESSSMConfig)
    assert type(AutoModel.from_config(config)) is ESSSMModel
    assert type(AutoModelForCausalLM.from_config(config)) is ESSSMForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is ESSSMForSequenceClassification


REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_essm"] = None  # the package must not be importable: only the saved code may run
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, auto_name, budgets, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    auto = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
            "AutoModelForSequenceClassification": AutoModelForSequenceClassification}[auto_name]
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
    x = torch.tensor(inputs)
    with torch.no_grad():
        # A null budget calls without one: the model's default.
        out = {json.dumps(k): model(x, **({} if k is None else {"spectral_budget": k}))[0].tolist() for k in budgets}
    print(json.dumps(out))
    """
)


def load_in_clean_process(folder, auto_name, budgets, x, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOADER, str(folder), auto_name, json.dumps(budgets), json.dumps(x.tolist())],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {json.loads(k): torch.tensor(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize(
    "model_class, auto_name",
    [(ESSSMForCausalLM, "AutoModelForCausalLM"), (ESSSMForSequenceClassification, "AutoModelForSequenceClassification"),
     (ESSSMForCausalLM, "AutoModel")],
)
def test_remote_code_folder_loads_in_a_clean_process(config, model_class, auto_name, tmp_path):
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path / "saved")
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert {"configuration_essm.py", "modeling_essm.py", "spectral_filters.py"} <= set(saved)
    auto_map = json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    x = tokens()
    remote = load_in_clean_process(tmp_path / "saved", auto_name, [2, 8, K], x, tmp_path)
    local = model if auto_name != "AutoModel" else model.model
    with torch.no_grad():
        for k, output in remote.items():
            assert torch.equal(output, local(x, spectral_budget=k)[0])


# --- training memory: chunks recomputed in backward ------------------------------------------------------------


@pytest.mark.parametrize("saved_channels", [0, 4, K], ids=["none-saved", "4-saved", "all-saved"])
@pytest.mark.parametrize("k", [2, 7, K])
def test_training_gradients_through_recomputed_chunks_match_the_reference(k, saved_channels):
    torch.manual_seed(0)
    saved_mb = saved_channels * 2 * 32 * 37 * 4 / 2**20  # float32 (B, D, T) convolutions of the channels saved
    # Chunks of 3: budget 7 recomputes 3 in backward.
    model = ESSSMForCausalLM(tiny_config(spectral_recompute=True, spectral_saved_mb=saved_mb))
    basis, mixer = model.model.spectral_basis, model.model.layers[0].mixer
    u = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    probe = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(2))
    (mixer(u, basis.filter_spectrum(37, k), k) * probe).sum().backward()
    fast = {name: p.grad.clone() for name, p in mixer.named_parameters()} | {"u": u.grad.clone()}
    mixer.zero_grad(set_to_none=True)
    u.grad = None
    (naive_mixer(mixer, u, basis.filters, basis.eigenvalues, k) * probe.double()).sum().backward()
    reference = {name: p.grad for name, p in mixer.named_parameters()} | {"u": u.grad}
    for name, grad in fast.items():
        scale = reference[name].abs().max().item()  # the stored M_j get c = 100 times the gradient: float32 is relative
        torch.testing.assert_close(grad.double(), reference[name].double(), atol=1e-6 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("saved_mb", [0, 30])  # none of the convolutions saved for backward, or all of them
@pytest.mark.parametrize("bf16", [False, True])
def test_recomputed_and_kept_convolutions_give_the_same_gradients_with_padding_and_accumulation(bf16, saved_mb):
    torch.manual_seed(0)
    kept = ESSSMForCausalLM(tiny_config(spectral_recompute=False))
    # Chunks of 3: budget 7 is 3 + 3 + 1.
    recomputed = ESSSMForCausalLM(tiny_config(spectral_recompute=True, spectral_saved_mb=saved_mb))
    recomputed.load_state_dict(kept.state_dict())
    x = tokens(batch=4, seq_len=50)
    mask = torch.ones_like(x)
    mask[0, :10] = mask[3, :4] = 0  # left padding
    for model in (kept, recomputed):
        for micro_batch in (slice(0, 2), slice(2, 4)):  # gradient accumulation over two micro-batches
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(x[micro_batch], attention_mask=mask[micro_batch], labels=x[micro_batch],
                             spectral_budget=7).loss
            loss.backward()
    # Both run the same chunks; recomputation repeats each chunk's forward in backward, so only rounding may differ.
    tolerance = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    for (name, expected), actual in zip(kept.named_parameters(), recomputed.parameters()):
        scale = expected.grad.abs().max().item() or 1.0
        torch.testing.assert_close(actual.grad / scale, expected.grad / scale, **tolerance, msg=name)


def test_chunk_sizes_follow_the_path(monkeypatch):
    """Kept training chunks hold at most REUSED_BYTES of convolution output (then glibc reuses freed blocks), the
    operators' (recomputed training, and inference whatever spectral_recompute) at most RECOMPUTED_CHUNK_BYTES."""
    model = ESSSMForCausalLM(tiny_config(num_hidden_layers=1, spectral_chunk_size=8, spectral_recompute=True))
    mixer, basis = model.model.layers[0].mixer, model.model.spectral_basis
    u = torch.randn(2, 100, 32)
    channel_bytes = 2 * 32 * 2 * (basis.filter_spectrum(100, K).shape[-1] - 1) * 4
    monkeypatch.setattr("modeling_essm.modeling_essm.REUSED_BYTES", 3 * channel_bytes)
    monkeypatch.setattr("modeling_essm.modeling_essm.RECOMPUTED_CHUNK_BYTES", 2 * channel_bytes)
    sizes = []
    project = mixer.project_channels
    monkeypatch.setattr(mixer, "project_channels", lambda *inputs: sizes.append(inputs[1].shape[0]) or project(*inputs))
    monkeypatch.setattr("modeling_essm.modeling_essm.gated_spectral_channels",
                        lambda *inputs: sizes.append(("recomputed", inputs[-2])) or gated_spectral_channels(*inputs))
    for recompute, grad, expected in ((True, True, [("recomputed", 2)]), (False, True, [3, 3, 3, 3, 3, 1]),
                                      (True, False, [("recomputed", 2)]), (False, False, [("recomputed", 2)])):
        sizes.clear()
        mixer.recompute = recompute
        with torch.set_grad_enabled(grad):
            mixer(u, basis.filter_spectrum(100, K), K)
        assert sizes == expected, (recompute, grad)


def test_saved_channels_follow_spectral_saved_mb(monkeypatch):
    """As many whole float32 (B, D, T) convolutions as spectral_saved_mb holds, at most the budget."""
    channel_mb = 2 * 32 * 100 * 4 / 2**20
    saved = []
    monkeypatch.setattr("modeling_essm.modeling_essm.gated_spectral_channels",
                        lambda *inputs: saved.append(inputs[-1]) or gated_spectral_channels(*inputs))
    u = torch.randn(2, 100, 32)
    # Any finite cap works, however large: 1e300 MB is far past what fits in bytes as a float.
    for saved_mb, k, expected in ((0, K, 0), (3.5 * channel_mb, K, 3), (3.5 * channel_mb, 2, 3), (30, K, 1228),
                                  (1e300, K, int(1e300 // channel_mb))):
        model = ESSSMForCausalLM(tiny_config(num_hidden_layers=1, spectral_saved_mb=saved_mb)).train()
        mixer, basis = model.model.layers[0].mixer, model.model.spectral_basis
        mixer(u, basis.filter_spectrum(100, k), k)
        assert saved[-1] == expected, saved_mb  # the operators take min(saved, k) (tests/test_spectral_channels.py)


def test_chunks_and_saved_channels_are_those_of_one_block_of_sequences(monkeypatch):
    """The operators take the batch in blocks (spectral_channels.FFT_BLOCK_BYTES): a block of one sequence saves
    as many channels as spectral_saved_mb holds of one sequence's, and its chunks are sized by one sequence's."""
    model = ESSSMForCausalLM(tiny_config(num_hidden_layers=1, spectral_chunk_size=8)).train()
    mixer, basis = model.model.layers[0].mixer, model.model.spectral_basis
    sequence_mb, n_fft = 32 * 100 * 4 / 2**20, 2 * (basis.filter_spectrum(100, K).shape[-1] - 1)
    mixer.saved_mb, mixer.chunk_bytes = 3.5 * sequence_mb, 2 * 32 * n_fft * 4  # two sequences' channel
    calls = []
    monkeypatch.setattr("modeling_essm.modeling_essm.gated_spectral_channels",
                        lambda *inputs: calls.append(inputs[-2:]) or gated_spectral_channels(*inputs))
    u = torch.randn(2, 100, 32)
    mixer(u, basis.filter_spectrum(100, K), K)  # one block of both sequences
    monkeypatch.setattr("modeling_essm.spectral_channels.FFT_BLOCK_BYTES", 32 * n_fft * 4)  # one sequence
    mixer(u, basis.filter_spectrum(100, K), K)
    assert calls == [(1, 1), (2, 3)]  # (chunk, saved) per block


@pytest.mark.parametrize("recompute", [False, True])
def test_with_recomputation_training_memory_stops_growing_with_the_budget_above_one_chunk(recompute):
    from modeling_essm.planner import peak_memory_mb

    torch.manual_seed(0)
    # Recomputing, four channels' convolutions are saved for backward (float32, B=8, D=32, T=512): a fixed cap.
    config = tiny_config(num_hidden_layers=1, max_position_embeddings=512, spectral_chunk_size=4,
                         spectral_recompute=recompute, spectral_saved_mb=4 * 8 * 32 * 512 * 4 / 2**20)
    model = ESSSMForCausalLM(config)
    x = tokens(batch=8, seq_len=512)

    def forward_backward(k):
        model(x, labels=x, spectral_budget=k).loss.backward()
        model.zero_grad(set_to_none=True)

    peaks = {k: peak_memory_mb(lambda: forward_backward(k), torch.device("cpu")) for k in (4, K)}
    # Kept for backward, the 16 channels' convolutions make the peak about 1.8x that of one chunk of 4.
    assert (peaks[K] < 1.2 * peaks[4]) == recompute, peaks
