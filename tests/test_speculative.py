import pytest
import torch
from conftest import tiny_config
from generation_helpers import K, assert_same_generation, greedy, lm, one_thread, record_budgets, tokens  # noqa: F401
from torch.testing import assert_close

from modeling_essm import ESSSMForCausalLM
from modeling_essm.cache_essm import ESSSMCache

NEW_TOKENS = 40


def prompt(seed=0):
    return tokens(1, 30, seed=seed)


def run_recorded(model, watched, **kwargs):
    """Greedy generation of NEW_TOKENS, with the budget of every forward call of each model in `watched`."""
    records = [record_budgets(m) for m in watched]
    try:
        out = greedy(model, prompt(), max_new_tokens=NEW_TOKENS, **kwargs)
    finally:
        for _, handle in records:
            handle.remove()
    return out, [budgets for budgets, _ in records]


@pytest.mark.parametrize(
    "budget, draft_budget, num_tokens, schedule",
    [(K, 2, 4, "constant"), (K, 4, 1, "constant"), (K, 8, 7, "heuristic"), (8, 3, 3, "constant"),
     (4, 2, 5, "heuristic")],
)
def test_self_speculative_greedy_decoding_gives_the_tokens_of_plain_decoding(lm, budget, draft_budget, num_tokens,
                                                                             schedule):
    out, (budgets,) = run_recorded(lm, [lm], spectral_budget=budget, draft_budget=draft_budget,
                                   num_assistant_tokens=num_tokens, num_assistant_tokens_schedule=schedule)
    assert_same_generation(out, greedy(lm, prompt(), max_new_tokens=NEW_TOKENS, spectral_budget=budget))
    verifications, drafts = budgets.count(budget), budgets.count(draft_budget)
    assert verifications + drafts == len(budgets)  # the same weights, at two budgets only
    assert verifications < NEW_TOKENS  # drafts were accepted: some rounds verified several tokens at once
    assert drafts >= NEW_TOKENS - verifications  # every accepted token was drafted first


def test_self_speculative_decoding_drafts_three_tokens_per_round_unless_asked(lm):
    def longest_draft_run(budgets):
        runs = "".join("d" if budget == 8 else " " for budget in budgets).split()
        return max(len(run) for run in runs)

    _, (budgets,) = run_recorded(lm, [lm], spectral_budget=K, draft_budget=8)
    assert longest_draft_run(budgets) == 3  # not transformers' 20, meant for a separate, far cheaper draft model
    _, (budgets,) = run_recorded(lm, [lm], spectral_budget=K, draft_budget=8, num_assistant_tokens=5)
    assert longest_draft_run(budgets) == 5


@pytest.mark.parametrize("assistant", ["sliced", "unrelated"])
def test_assisted_decoding_with_an_essm_assistant_gives_the_tokens_of_plain_decoding(lm, assistant):
    if assistant == "sliced":
        source = ESSSMForCausalLM(lm.config).eval()
        source.load_state_dict(lm.state_dict())
        source.generation_config.spectral_budget = 8  # above the slice's K: the slice must not inherit it
        helper, own_budget = source.slice_to_budget(4), 4
    else:  # other weights, so every round's drafts are rejected and the main cache cropped back
        torch.manual_seed(1)
        helper, own_budget = ESSSMForCausalLM(tiny_config(hidden_size=16, num_spectral_filters=8)).eval(), 3
        helper.generation_config.spectral_budget = 3
    out, (main_budgets, helper_budgets) = run_recorded(lm, [lm, helper], spectral_budget=K, assistant_model=helper,
                                                       num_assistant_tokens=3)
    assert_same_generation(out, greedy(lm, prompt(), max_new_tokens=NEW_TOKENS, spectral_budget=K))
    # Each model at its own budget: the main model's kwarg would be out of range for the assistant.
    assert set(main_budgets) == {K} and set(helper_budgets) == {own_budget}
    assert (len(main_budgets) < NEW_TOKENS) == (assistant == "sliced")  # rounds that kept drafts, or none


def test_prompt_lookup_decoding_gives_the_tokens_of_plain_decoding(lm):
    # This random model falls into a loop, which the lookup finds in the text so far and proposes.
    out, (budgets,) = run_recorded(lm, [lm], spectral_budget=8, prompt_lookup_num_tokens=4)
    assert_same_generation(out, greedy(lm, prompt(), max_new_tokens=NEW_TOKENS, spectral_budget=8))
    assert set(budgets) == {8} and len(budgets) < NEW_TOKENS


def test_self_speculative_sampling_keeps_the_full_budget_distribution():
    # Without the local convolution, a budget-independent path that in this random model brings budget 2 within a
    # total variation of 0.25 of the full budget, too close to tell which distribution the samples follow.
    torch.manual_seed(0)
    lm = ESSSMForCausalLM(tiny_config(initializer_range=0.1, local_conv_size=0)).eval()
    # The first new token is forced, so the second is the first one drafted: at budget 2 on the full budget's history
    # of the prompt, as the draft does, then accepted or resampled by speculative sampling. Its frequencies must follow
    # the full budget's distribution p, not the draft's q, a total variation of 0.5 away from it; 400 draws estimate
    # a distribution over these few tokens to about 0.05.
    ids = prompt(seed=5)
    with torch.no_grad():
        first = lm(ids).logits[:, -1:].argmax(-1)
        p_logits = lm(torch.cat([ids, first], 1)).logits[0, -1]
        draft = ESSSMCache(lm.config)
        draft.follow(lm(ids, use_cache=True).cache, 0, (2, 2))
        q_logits = lm(first, cache=draft, spectral_budget=2).logits[0, -1]
    p, q = (torch.zeros(259).index_put_((top.indices,), top.values.softmax(0))
            for top in (p_logits.topk(4), q_logits.topk(4)))
    assert (p - q).abs().sum() / 2 > 0.4

    def allowed(batch_id, sequence):
        return [first.item()] if len(sequence) == 30 else list(range(259))

    torch.manual_seed(0)
    second_tokens = [lm.generate(ids, do_sample=True, top_k=4, max_new_tokens=3, eos_token_id=None, draft_budget=2,
                                 num_assistant_tokens=1, prefix_allowed_tokens_fn=allowed)[0, 31].item()
                     for _ in range(400)]
    frequencies = torch.bincount(torch.tensor(second_tokens), minlength=259) / 400
    assert (frequencies - p).abs().sum() / 2 < 0.12


def test_a_draft_cache_takes_over_the_verified_histories(lm):
    ids = tokens(1, 60, seed=42)
    with torch.no_grad():
        source = lm(ids[:, :40], use_cache=True, spectral_budget=4).cache
        draft = lm(ids[:, :20], use_cache=True, spectral_budget=4).cache
        lm(tokens(1, 10, seed=43), cache=draft, spectral_budget=4)  # drafts that verification rejected
        draft.follow(source, 20, (4, 4))
        logits = [lm(ids[:, t : t + 1], cache=draft, spectral_budget=4).logits for t in range(40, 60)]
        assert_close(torch.cat(logits, 1), lm(ids, spectral_budget=4).logits[:, 40:], atol=1e-4, rtol=0)
        # From a cache of the full budget: its histories are continued at the draft's budget, not rebuilt.
        full = lm(ids[:, :40], use_cache=True).cache
        draft.follow(full, 0, (2, 2))
        lm(ids[:, 40:41], cache=draft, spectral_budget=2)
    assert draft.spectral_budget == (2, 2) and draft.get_seq_length() == 41
    assert all(torch.equal(mine.inputs.values[:, :40], theirs.inputs.values)
               for mine, theirs in zip(draft.layers, full.layers))


@pytest.mark.parametrize("budget, bad", [(K, K), (K, 1), (K, 2.5), (K, True), (K, "2"), (8, 8), (8, 12)])
def test_bad_draft_budgets_are_refused_before_any_forward(lm, budget, bad):
    budgets, handle = record_budgets(lm)
    try:
        with pytest.raises(ValueError, match=rf"draft_budget must be an integer in \[2, {budget - 1}\]"):
            lm.generate(prompt(), max_new_tokens=5, spectral_budget=budget, draft_budget=bad)
    finally:
        handle.remove()
    assert budgets == []


def test_assisted_decoding_refuses_what_it_cannot_do(lm):
    budgets, handle = record_budgets(lm)
    try:
        with pytest.raises(ValueError, match=r"cannot be combined with \['assistant_model'\]"):
            lm.generate(prompt(), max_new_tokens=5, draft_budget=2, assistant_model=lm)
        with pytest.raises(ValueError, match=r"cannot be combined with \['prompt_lookup_num_tokens'\]"):
            lm.generate(prompt(), max_new_tokens=5, draft_budget=2, prompt_lookup_num_tokens=3)
        for bad in [0, -2, 2.5]:
            with pytest.raises(ValueError, match="num_assistant_tokens .* must be a positive integer"):
                lm.generate(prompt(), max_new_tokens=5, draft_budget=2, num_assistant_tokens=bad)
        assert budgets == []
        cache = lm(prompt(), use_cache=True).cache
        with pytest.raises(ValueError, match="starts from an empty cache"):
            lm.generate(prompt(), cache=cache, max_new_tokens=5, draft_budget=2)
        assert len(budgets) == 1 and cache.get_seq_length() == 30
    finally:
        handle.remove()
