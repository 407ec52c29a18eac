"""Per-layer budgets: `spectral_budget` as one integer per layer, in forward, generate, the cache, slicing, export
and the model's default budget."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from generation_helpers import assert_same_generation, greedy, one_thread  # noqa: F401  (one_thread: autouse)
from transformers import AutoModelForCausalLM, pipeline

from modeling_essm import ESSSMCache, ESSSMForCausalLM, ESSSMForSequenceClassification, build_fast_tokenizer
from modeling_essm.export_essm import export_at_budget
from modeling_essm.naive import naive_mixer

K = 16  # num_spectral_filters of tiny_config


def tokens(batch=2, seq_len=30, seed=0):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def three_layer_lm(**overrides):
    torch.manual_seed(0)
    # Weights 5x the default init: a layer run at the wrong budget moves the logits far above float error.
    return ESSSMForCausalLM(tiny_config(num_hidden_layers=3, initializer_range=0.1, **overrides)).eval()


def by_hand(model, input_ids, layer_budgets):
    """The logits with each block written out and its mixer replaced by the float64 reference at that layer's
    budget (`naive.naive_mixer`): nothing of the model's budget handling is used."""
    def norm(layer, x):
        return F.layer_norm(x, (x.shape[-1],), layer.weight.double(), layer.bias.double(), layer.eps)

    def linear(layer, x):
        return x @ layer.weight.double().T + layer.bias.double()

    backbone, basis = model.model, model.model.spectral_basis
    x = backbone.embed_tokens(input_ids).double()
    for block, k in zip(backbone.layers, layer_budgets):
        x = x + naive_mixer(block.mixer, norm(block.mixer_norm, x), basis.filters, basis.eigenvalues, k)
        x = x + linear(block.ffn.fc_out, F.gelu(linear(block.ffn.fc_in, norm(block.ffn_norm, x))))
    return norm(backbone.norm_f, x) @ model.lm_head.weight.double().T


@pytest.mark.parametrize("layer_budgets", [(2, 9, K), (K, 3, 5), (4, 4, 4)])
def test_per_layer_outputs_equal_each_layer_run_by_hand_at_its_budget(layer_budgets):
    model = three_layer_lm()
    x = tokens()
    with torch.no_grad():
        logits = model(x, spectral_budget=list(layer_budgets)).logits
        expected = by_hand(model, x, layer_budgets)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-4)


def test_equal_per_layer_budgets_are_the_integer_budget_and_tensors_are_accepted():
    model = three_layer_lm()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x, spectral_budget=[5, 5, 5]).logits, model(x, spectral_budget=5).logits)
        assert torch.equal(model(x, spectral_budget=torch.tensor([2, 9, K])).logits,
                           model(x, spectral_budget=(2, 9, K)).logits)


@pytest.mark.parametrize("budget, message", [
    ([4, 4], r"a list of 3 integers, one per layer.*got 2 per-layer budgets \[4, 4\]"),
    ([4, 1, 4], r"each in \[2, that layer's K\].*got 1 for layer 1 in \[4, 1, 4\]"),
    ([4, 4, K + 1], rf"got {K + 1} for layer 2"),
    ([4, 2.5, 4], r"got 2.5 for layer 1"),
    (torch.tensor([[4, 4, 4]]), r"got 1 per-layer budgets \[\[4, 4, 4\]\]"),
    (torch.tensor([4.0, 4.0, 4.0]), r"got 4.0 for layer 0"),
])
def test_bad_per_layer_budgets_name_the_layer_and_the_valid_range(budget, message):
    model = three_layer_lm()
    with pytest.raises(ValueError, match=message):
        model(tokens(), spectral_budget=budget)
    with pytest.raises(ValueError, match=message):
        model.generate(tokens(), max_new_tokens=2, spectral_budget=budget)


def test_generation_at_per_layer_budgets_equals_uncached_greedy_decoding():
    model = three_layer_lm()
    prompt, budgets = tokens(seq_len=12), [3, K, 6]
    cached = greedy(model, prompt, max_new_tokens=25, spectral_budget=budgets)
    ids, logits = prompt, []
    with torch.no_grad():
        for _ in range(25):
            step = model(ids, spectral_budget=budgets).logits[:, -1]
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached.sequences, ids)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("future_fill", [True, False], ids=["future_fill", "naive_cache"])
def test_a_cache_continued_at_other_per_layer_budgets_equals_a_fresh_forward(future_fill):
    model = three_layer_lm()
    x = tokens(seq_len=40)
    cache = ESSSMCache(model.config, future_fill=future_fill)
    with torch.no_grad():
        model(x[:, :20], spectral_budget=[2, 9, K], cache=cache)
        model(x[:, 20:30], spectral_budget=[2, 9, K], cache=cache)
        assert cache.spectral_budget == (2, 9, K)
        continued = [model(x[:, t:t + 1], spectral_budget=[K, 4, 2], cache=cache).logits for t in range(30, 40)]
        assert cache.spectral_budget == (K, 4, 2)
        fresh = model(x, spectral_budget=[K, 4, 2]).logits[:, 30:]
    torch.testing.assert_close(torch.cat(continued, 1), fresh, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_class", [ESSSMForCausalLM, ESSSMForSequenceClassification])
def test_slicing_to_per_layer_budgets_equals_the_uncompressed_model_at_them(model_class, tmp_path):
    torch.manual_seed(0)
    model = model_class(tiny_config(num_hidden_layers=3, initializer_range=0.1)).eval()
    small = model.slice_to_budget([4, K, 2])
    assert small.config.num_spectral_filters == K and small.config.num_spectral_filters_per_layer == [4, K, 2]
    assert [tuple(block.mixer.spectral_proj.shape[:1]) for block in small.model.layers] == [(4,), (K,), (2,)]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], model(x, spectral_budget=[4, K, 2])[0], atol=1e-5, rtol=1e-5)
        # An integer budget caps each layer at its own K; per-layer budgets are checked against each layer's K.
        torch.testing.assert_close(small(x, spectral_budget=6)[0], model(x, spectral_budget=[4, 6, 2])[0],
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"K per layer: \[4, 16, 2\]\); got 5 for layer 0"):
            small(x, spectral_budget=[5, 5, 2])
    small.save_pretrained(tmp_path)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_spectral_filters_per_layer == [4, K, 2]
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], small(x)[0])


def test_a_per_layer_slice_generates_what_the_uncompressed_model_does_at_its_budgets():
    model = three_layer_lm()
    small = model.slice_to_budget([4, K, 2])
    prompt = tokens(seq_len=12)
    assert_same_generation(greedy(small, prompt, max_new_tokens=20),
                           greedy(model, prompt, max_new_tokens=20, spectral_budget=[4, K, 2]))
    # Slicing again, per layer or to an integer, composes.
    assert small.slice_to_budget([2, 3, 2]).config.num_spectral_filters_per_layer == [2, 3, 2]
    assert small.slice_to_budget(3).config.num_spectral_filters_per_layer == [3, 3, 2]


def test_self_speculative_decoding_verifies_at_per_layer_budgets():
    model = three_layer_lm()
    prompt = tokens(batch=1, seq_len=10)
    plain = greedy(model, prompt, max_new_tokens=15, spectral_budget=[K, 8, K])
    drafted = greedy(model, prompt, max_new_tokens=15, spectral_budget=[K, 8, K], draft_budget=2)
    assert torch.equal(plain.sequences, drafted.sequences)
    with pytest.raises(ValueError, match=r"draft_budget must be an integer in \[2, 6\].*largest layer budget"):
        model.generate(prompt, max_new_tokens=2, spectral_budget=[7, 4, 3], draft_budget=7)


def test_export_at_per_layer_budgets_matches_the_model():
    model = three_layer_lm()
    x = tokens()
    exported = export_at_budget(model, [4, K, 2], input_ids=x).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x), model(x, spectral_budget=[4, K, 2]).logits,
                                   atol=1e-4, rtol=1e-4)


def test_a_per_layer_default_budget_is_saved_and_used_by_pipelines(tmp_path):
    model = three_layer_lm()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, spectral_budget=[2, 9, K]).eval()
    assert loaded.config.spectral_budget == [2, 9, K]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x, spectral_budget=[2, 9, K]).logits)
    loaded.save_pretrained(tmp_path / "resaved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").config.spectral_budget == [2, 9, K]
    tokenizer = build_fast_tokenizer()
    text = pipeline("text-generation", model=loaded, tokenizer=tokenizer)(
        "To be", max_new_tokens=8, do_sample=False, eos_token_id=None)[0]["generated_text"]
    ids = tokenizer("To be", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, spectral_budget=[2, 9, K])
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
