import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from generation_helpers import K, L, assert_same_generation, greedy, left_pad, lm, one_thread, record_budgets, tokens
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig, pipeline

from modeling_essm import ESSSMForCausalLM, ESSSMTokenizer
from modeling_essm.cache_essm import ESSSMCache, epoch_length, filter_segment_spectra, future_contributions

BUDGETS = [2, 8, K]


# --- forward with a cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", BUDGETS)
def test_token_by_token_decoding_equals_the_full_forward(lm, k):
    ids = tokens(2, L, seed=1)  # up to the last position the filters reach, through several FutureFill epochs
    cache = ESSSMCache(lm.config)
    with torch.no_grad():
        logits = [lm(ids[:, :20], cache=cache, spectral_budget=k).logits]
        logits += [lm(ids[:, t : t + 1], cache=cache, spectral_budget=k).logits for t in range(20, L)]
        assert_close(torch.cat(logits, 1), lm(ids, spectral_budget=k).logits, atol=1e-4, rtol=0)


def test_future_fill_equals_the_naive_cache_with_a_bounded_direct_window(lm):
    ids = tokens(3, L, seed=2)
    future_fill, naive = ESSSMCache(lm.config), ESSSMCache(lm.config, future_fill=False)
    epochs = set()
    with torch.no_grad():
        for cache in (future_fill, naive):
            lm(ids[:, :9], cache=cache, spectral_budget=8)
        for t in range(9, L):
            step = ids[:, t : t + 1]
            assert_close(lm(step, cache=future_fill, spectral_budget=8).logits,
                         lm(step, cache=naive, spectral_budget=8).logits, atol=1e-5, rtol=0)
            for layer in future_fill.layers:  # each step sums at most E rows directly, the rest came by FFT
                size = len(layer.epoch_filters) - 1
                assert layer.epoch_start % size == 0 and layer.epoch_start <= t < layer.epoch_stop
                assert size <= epoch_length(t) and (layer.future is not None) == (layer.epoch_start > 0)
            epochs.add((future_fill.layers[0].epoch_start, len(future_fill.layers[0].epoch_filters) - 1))
    assert len(epochs) >= 5 and len({size for _, size in epochs}) == 2  # E grew from 16 to 32 on the way
    assert all(layer.epoch_start == 0 and layer.future is None for layer in naive.layers)


def test_future_contributions_are_the_direct_sums_over_the_history():
    size, blocks, k, hidden, length = 8, 5, 3, 4, 44  # the last epoch runs past L = 44: taps beyond it are zero
    generator = torch.Generator().manual_seed(0)
    history = torch.randn(2, blocks * size, hidden, generator=generator)
    filters = torch.randn(length, k, generator=generator)
    future = future_contributions(history, filter_segment_spectra(filters, size))  # (B, E, k, D)
    padded = torch.cat([filters, torch.zeros(size, k)]).double()
    lags = blocks * size + torch.arange(size)[:, None] - torch.arange(blocks * size)  # (E, t0): t - s
    expected = torch.einsum("psk,bsd->bpkd", padded[lags], history.double())
    assert_close(future.double(), expected, atol=1e-5, rtol=0)


def test_epochs_are_powers_of_two_near_three_square_roots_of_the_context():
    for position in [30, 100, 512, 2000, 8192, 50_000]:
        size = epoch_length(position)
        assert size & (size - 1) == 0 and 0.7 < size / (3 * position**0.5) < 1.42
    assert epoch_length(0) == epoch_length(1) == 16


@pytest.mark.parametrize("k", BUDGETS)
def test_chunked_continuation_equals_the_full_forward(lm, k):
    ids = tokens(2, 120, seed=3)
    # Chunks of 1 to 43 tokens, before, inside and across epochs: those up to E long (30-35 crosses the epoch
    # boundary at 32) go through FutureFill like single tokens, the longer ones through one FFT.
    bounds = [0, 17, 18, 21, 30, 35, 40, 41, 42, 77, 120]
    cache = ESSSMCache(lm.config)
    with torch.no_grad():
        logits = [lm(ids[:, a:b], cache=cache, spectral_budget=k).logits for a, b in zip(bounds, bounds[1:])]
        assert_close(torch.cat(logits, 1), lm(ids, spectral_budget=k).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("future_fill", [True, False], ids=["future_fill", "naive"])
@pytest.mark.parametrize("k", BUDGETS)
def test_a_cropped_cache_continues_like_a_fresh_forward_over_the_kept_tokens(lm, k, future_fill):
    sequence = tokens(2, 90, seed=40)
    cache = ESSSMCache(lm.config, future_fill=future_fill)
    other = 2 if k != 2 else K
    with torch.no_grad():
        lm(sequence[:, :40], cache=cache, spectral_budget=k)
        for t in range(40, 90):
            lm(sequence[:, t : t + 1], cache=cache, spectral_budget=k)
        # Crops inside the current FutureFill epoch and below its start, to zero, then continuations by single
        # tokens, draft-sized chunks and a long chunk with other tokens than before, the last at another budget.
        rounds = [(85, [1, 1, 5], k), (70, [4, 1], k), (33, [1, 30], k), (62, [1], k), (0, [20, 1], k),
                  (15, [3, 1], other)]
        for i, (keep, chunks, budget) in enumerate(rounds):
            cache.crop(keep - cache.get_seq_length())
            assert cache.get_seq_length() == keep
            sequence = torch.cat([sequence[:, :keep], tokens(2, sum(chunks), seed=50 + i)], 1)
            bounds = [keep + sum(chunks[:j]) for j in range(len(chunks) + 1)]
            logits = [lm(sequence[:, a:b], cache=cache, spectral_budget=budget).logits
                      for a, b in zip(bounds, bounds[1:])]
            expected = lm(sequence, spectral_budget=budget).logits[:, keep:]
            assert_close(torch.cat(logits, 1), expected, atol=1e-4, rtol=0)


def test_crop_refuses_counts_it_cannot_remove(lm):
    cache = lm(tokens(2, 10, seed=41), use_cache=True, spectral_budget=4).cache
    for bad in [1, -11, -2.0, True, None]:
        with pytest.raises(ValueError, match=r"an integer in \[-10, 0\] for this cache of 10 tokens"):
            cache.crop(bad)
    cache.crop(0)
    assert cache.get_seq_length() == 10 and cache.spectral_budget == (4, 4)
    cache.crop(-10)
    assert cache.get_seq_length() == 0 and cache.spectral_budget is None


@pytest.mark.parametrize("first, second", [(2, K), (K, 8), (8, 2)])
def test_continuing_at_another_budget_equals_a_full_forward_at_that_budget(lm, first, second):
    ids, mask = left_pad([tokens(1, 80, seed=4), tokens(1, 90, seed=5)], lm.config.pad_token_id)
    cache = ESSSMCache(lm.config)
    with torch.no_grad():
        lm(ids[:, :50], attention_mask=mask[:, :50], cache=cache, spectral_budget=first)
        for t in range(50, 60):  # into a FutureFill epoch at the first budget
            lm(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, spectral_budget=first)
        assert cache.spectral_budget == (first, first)  # one budget per block
        logits = [lm(ids[:, 60:61], attention_mask=mask[:, :61], cache=cache, spectral_budget=second).logits,
                  lm(ids[:, 61:75], attention_mask=mask[:, :75], cache=cache, spectral_budget=second).logits]
        logits += [lm(ids[:, t : t + 1], cache=cache, spectral_budget=second).logits for t in range(75, 90)]
        assert cache.spectral_budget == (second, second)
        expected = lm(ids, attention_mask=mask, spectral_budget=second).logits[:, 60:]
    assert_close(torch.cat(logits, 1), expected, atol=1e-4, rtol=0)


def test_left_padding_stays_masked_in_the_cache(lm):
    ids, mask = left_pad([tokens(1, 23, seed=6), tokens(1, 40, seed=7)], lm.config.pad_token_id)
    cache = ESSSMCache(lm.config)
    with torch.no_grad():
        lm(ids, attention_mask=mask, cache=cache, spectral_budget=8)
        steps = tokens(2, 30, seed=8)
        logits = [lm(steps[:, i : i + 1], cache=cache, spectral_budget=8).logits for i in range(30)]
        alone = lm(torch.cat([ids[:1, 17:], steps[:1]], 1), spectral_budget=8).logits[:, 23:]
    assert_close(torch.cat(logits, 1)[:1], alone, atol=1e-4, rtol=0)


def test_forward_keeps_a_cache_only_when_asked(lm):
    ids = tokens(2, 30, seed=9)
    assert lm(ids).cache is None
    cache = lm(ids, use_cache=True, spectral_budget=4).cache
    assert isinstance(cache, ESSSMCache) and cache.get_seq_length() == 30 and cache.spectral_budget == (4, 4)
    with pytest.warns(FutureWarning):
        continued = lm(ids[:, :1], past_key_values=cache, spectral_budget=4)  # the deprecated name
    assert continued.cache is cache and cache.get_seq_length() == 31
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.spectral_budget is None
    assert_close(lm(ids, cache=cache).logits, lm(ids).logits)


def test_bad_caches_and_masks_are_refused(lm):
    ids = tokens(2, 10, seed=10)
    with pytest.raises(ValueError, match="ESSSMCache"):
        lm(ids, cache=DynamicCache(config=lm.config))
    cache = lm(ids, use_cache=True).cache
    with pytest.raises(ValueError, match="holds 2 sequences but the inputs have 3"):
        lm(tokens(3, 1), cache=cache)
    with pytest.raises(ValueError, match="use_cache=False contradicts"):
        lm.generate(ids, cache=cache, use_cache=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must cover the new tokens or all 12"):
        lm(ids[:, :2], attention_mask=torch.ones(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"130 exceeds max_position_embeddings=128.*10 cached \+ 120 new"):
        lm(tokens(2, 120), cache=cache)
    assert cache.get_seq_length() == 10  # refused before touching the cache


# --- generate -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", BUDGETS)
def test_greedy_generation_with_the_cache_equals_without(lm, k):
    prompt = tokens(2, 24, seed=11)
    cached = greedy(lm, prompt, max_new_tokens=40, spectral_budget=k)
    assert_same_generation(cached, greedy(lm, prompt, max_new_tokens=40, spectral_budget=k, use_cache=False))
    assert isinstance(cached.cache, ESSSMCache) and cached.cache.spectral_budget == (k, k)
    assert cached.cache.get_seq_length() == 24 + 40 - 1  # the last token is returned, never fed


def test_sampling_with_the_cache_equals_without(lm):
    prompt = tokens(2, 24, seed=12)
    kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=30, spectral_budget=4, temperature=2.0)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(lm.generate(prompt, use_cache=use_cache, **kwargs))
    assert torch.equal(*runs) and runs[0].shape == (6, 54)
    assert len({tuple(row) for row in runs[0][:, 24:].tolist()}) == 6  # really sampled


@pytest.mark.parametrize("k", BUDGETS)
def test_beam_search_reorders_the_cache(lm, k):
    prompt = tokens(2, 20, seed=13)
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=20, spectral_budget=k,
                  return_dict_in_generate=True, output_scores=True)
    cached, uncached = lm.generate(prompt, **kwargs), lm.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)
    assert (cached.beam_indices[:, 1:20] != cached.beam_indices[:, :1]).any()  # beams did swap histories


@pytest.mark.parametrize("k", BUDGETS)
def test_left_padded_batch_generates_what_each_row_generates_alone(lm, k):
    rows = [tokens(1, 13, seed=14), tokens(1, 30, seed=15)]
    ids, mask = left_pad(rows, lm.config.pad_token_id)
    padded = greedy(lm, ids, attention_mask=mask, max_new_tokens=25, spectral_budget=k)
    assert_same_generation(padded, greedy(lm, ids, attention_mask=mask, max_new_tokens=25, spectral_budget=k,
                                          use_cache=False))
    for i, row in enumerate(rows):
        alone = greedy(lm, row, max_new_tokens=25, spectral_budget=k)
        assert torch.equal(padded.sequences[i, 30:], alone.sequences[0, row.shape[1] :])
        assert_close(torch.stack(padded.logits)[:, i], torch.stack(alone.logits)[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("inputs", ["whole", "whole with mask", "new with whole mask"])
@pytest.mark.parametrize("first, second", [(8, 8), (4, K)])
def test_generate_continues_a_returned_cache(lm, first, second, inputs):
    first_run = greedy(lm, tokens(2, 20, seed=16), max_new_tokens=10, spectral_budget=first)
    cache = first_run.cache
    seen = cache.get_seq_length()
    assert seen == 29  # the last generated token was returned, never fed
    whole = torch.cat([first_run.sequences, tokens(2, 6, seed=17)], 1)
    # transformers' rule: the whole sequence, whose cached part is skipped, or the new tokens with a longer mask.
    ids, mask = {"whole": (whole, None), "whole with mask": (whole, torch.ones_like(whole)),
                 "new with whole mask": (whole[:, seen:], torch.ones_like(whole))}[inputs]
    continued = greedy(lm, ids, attention_mask=mask, cache=cache, max_new_tokens=12, spectral_budget=second)
    expected = greedy(lm, whole, max_new_tokens=12, spectral_budget=second, use_cache=False)
    assert torch.equal(continued.sequences[:, -12:], expected.sequences[:, -12:])
    assert_close(torch.stack(continued.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)
    assert cache.spectral_budget == (second, second) and cache.get_seq_length() == whole.shape[1] + 11  # nothing fed twice


def test_generate_recomputes_the_last_token_when_the_cache_holds_the_whole_prompt(lm):
    prompt = tokens(2, 20, seed=30)
    cache = lm(prompt, use_cache=True, spectral_budget=8).cache
    continued = greedy(lm, prompt, cache=cache, max_new_tokens=8, spectral_budget=8)
    expected = greedy(lm, prompt, max_new_tokens=8, spectral_budget=8)
    assert torch.equal(continued.sequences, expected.sequences)
    assert_close(torch.stack(continued.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 27


def test_generate_refuses_inputs_that_do_not_continue_the_cache(lm):
    prompt, mask = left_pad([tokens(1, 15, seed=31), tokens(1, 20, seed=32)], lm.config.pad_token_id)
    first_run = greedy(lm, prompt, attention_mask=mask, max_new_tokens=5)
    cache = first_run.cache
    sequence = torch.cat([first_run.sequences, tokens(2, 5, seed=33)], 1)
    sequence_mask = torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1)
    changed = sequence.clone()
    changed[1, 7] = (changed[1, 7] + 1) % 256
    with pytest.raises(ValueError, match="differ from them at position 7 of row 1"):
        lm.generate(changed, attention_mask=sequence_mask, cache=cache, max_new_tokens=3)
    with pytest.raises(ValueError, match="differ from them at position 0 of row 0"):  # the padding is part of it
        lm.generate(sequence, attention_mask=torch.ones_like(sequence), cache=cache, max_new_tokens=3)
    with pytest.raises(ValueError, match="holds 24 tokens but the inputs, read as the whole sequence, only 5"):
        lm.generate(sequence[:, -5:], cache=cache, max_new_tokens=3)  # new tokens need a mask covering the cache
    with pytest.raises(ValueError, match="attention_mask covers 28 positions, fewer than the 30 inputs"):
        lm.generate(sequence, attention_mask=sequence_mask[:, :28], cache=cache, max_new_tokens=3)
    assert cache.get_seq_length() == 24
    assert lm.generate(sequence, attention_mask=sequence_mask, cache=cache, max_new_tokens=3).shape == (2, 33)


def test_inputs_embeds_prompt_generates_what_its_tokens_generate(lm):
    prompt = tokens(2, 20, seed=18)
    from_embeds = greedy(lm, inputs_embeds=lm.get_input_embeddings()(prompt), max_new_tokens=15, spectral_budget=8)
    from_ids = greedy(lm, prompt, max_new_tokens=15, spectral_budget=8)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, 20:])
    assert_close(torch.stack(from_embeds.logits), torch.stack(from_ids.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("strategy", [dict(do_sample=False), dict(do_sample=True), dict(num_beams=3)],
                         ids=["greedy", "sampling", "beam_search"])
def test_the_budget_reaches_every_forward_as_an_int(lm, strategy):
    budgets, handle = record_budgets(lm)
    try:
        lm.generate(tokens(2, 10, seed=19), max_new_tokens=6, spectral_budget=torch.tensor(5), **strategy)
    finally:
        handle.remove()
    assert len(budgets) == 6 and all(type(budget) is int and budget == 5 for budget in budgets)


def test_default_budget_lives_in_the_saved_generation_config(tmp_path):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(tiny_config())
    model.generation_config.spectral_budget = 3
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.generation_config.spectral_budget == 3
    prompt = tokens(1, 8, seed=20)
    budgets, handle = record_budgets(reloaded)
    try:
        reloaded.generate(prompt, max_new_tokens=2)
        reloaded.generate(prompt, max_new_tokens=2, spectral_budget=7)  # a generate kwarg overrides the default
        reloaded.generate(prompt, generation_config=GenerationConfig(spectral_budget=6, max_new_tokens=2))
        reloaded.generate(prompt, max_new_tokens=2, spectral_budget=None)  # None is the full budget, as in forward
    finally:
        handle.remove()
    assert budgets == [3, 3, 7, 7, 6, 6, K, K]
    with pytest.raises(ValueError, match=rf"\[2, {K}\]"):
        reloaded.generate(prompt, max_new_tokens=2, spectral_budget=K + 1)


def test_generating_past_max_position_embeddings_fails_before_any_forward(lm):
    budgets, handle = record_budgets(lm)
    try:
        with pytest.raises(ValueError, match=r"130 tokens.*max_position_embeddings=128"):
            lm.generate(tokens(1, 100), max_new_tokens=30)
        with pytest.raises(ValueError, match=r"129 tokens.*max_position_embeddings=128"):
            lm.generate(inputs_embeds=lm.get_input_embeddings()(tokens(1, 100)), max_new_tokens=29)
        assert budgets == []
        cache = lm(tokens(1, 100), use_cache=True).cache
        mask = torch.ones(1, 110, dtype=torch.long)  # the inputs are the new tokens
        with pytest.raises(ValueError, match=r"129 tokens \(100 cached.*max_position_embeddings=128"):
            lm.generate(tokens(1, 10), attention_mask=mask, cache=cache, max_new_tokens=19)
        assert len(budgets) == 1 and cache.get_seq_length() == 100
        lm.generate(tokens(1, 10), attention_mask=mask, cache=cache, max_new_tokens=18)  # exactly L fits
    finally:
        handle.remove()


# --- pipeline and a saved text-generation folder ---------------------------------------------------------


def test_text_generation_pipeline_passes_the_budget(lm):
    tokenizer = ESSSMTokenizer()
    generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    budgets, handle = record_budgets(lm)
    try:
        # eos_token_id=None: all 12 tokens, even where this random model would end the text early
        text = generator("To be, or not", max_new_tokens=12, spectral_budget=4, do_sample=False,
                         eos_token_id=None)[0]["generated_text"]
    finally:
        handle.remove()
    assert budgets == [4] * 12
    ids = tokenizer("To be, or not", return_tensors="pt").input_ids
    generated = lm.generate(ids, max_new_tokens=12, spectral_budget=4, do_sample=False, eos_token_id=None)[0]
    assert text == tokenizer.decode(generated, skip_special_tokens=True)


PIPELINE_IN_A_CLEAN_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_essm"] = None  # only the code saved in the folder may run
    from transformers import pipeline
    generator = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
    out = generator("To be, or not", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    drafted = generator("To be, or not", max_new_tokens=12, do_sample=False, draft_budget=2)[0]["generated_text"]
    print(json.dumps([out, drafted, type(generator.tokenizer).__name__]))
    """
)


def test_saved_folder_is_a_complete_offline_text_generation_model(lm, tmp_path):
    folder = tmp_path / "saved"
    model = ESSSMForCausalLM(lm.config)
    model.load_state_dict(lm.state_dict())
    model.generation_config.spectral_budget = 4
    model.save_pretrained(folder)
    ESSSMTokenizer().save_pretrained(folder)
    saved = {path.name for path in folder.iterdir()}
    assert {"tokenization_essm.py", "cache_essm.py", "modeling_essm.py", "speculative_essm.py"} <= saved
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PIPELINE_IN_A_CLEAN_PROCESS, str(folder)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text, drafted, tokenizer_name = json.loads(result.stdout.strip().splitlines()[-1])
    assert tokenizer_name == "ESSSMTokenizer" and drafted == text  # self-speculative decoding runs as remote code
    local = pipeline("text-generation", model=lm, tokenizer=ESSSMTokenizer())
    assert text == local("To be, or not", max_new_tokens=12, spectral_budget=4, do_sample=False)[0]["generated_text"]
