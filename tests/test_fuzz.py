"""Property-based tests of the public forward: whatever the shapes, budget, padding, dtype and cache split,
a call either raises a ValueError before any work or gives outputs that the model's exact paths agree on
(the whole sequence, a cached continuation, each row alone). Never a crash, a NaN or a silent mismatch.

The default run tries FAST_EXAMPLES cases per property; `pytest -m slow tests/test_fuzz.py` tries SLOW_EXAMPLES.
"""

import numbers

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_essm import ESSSMForCausalLM

K, L = 16, 128  # num_spectral_filters and max_position_embeddings of tiny_config
FAST_EXAMPLES, SLOW_EXAMPLES = 40, 5000

torch.manual_seed(0)
MODELS = {dtype: ESSSMForCausalLM(tiny_config()).eval().to(dtype) for dtype in (torch.float32, torch.bfloat16)}

budgets = st.one_of(st.none(), st.integers(-2, K + 2), st.booleans(), st.floats(allow_nan=True, width=32),
                    st.text(max_size=2), st.just(torch.tensor(4)), st.just(torch.tensor([2, 3])),
                    st.just(torch.tensor([2.0, 3.0])), st.lists(st.integers(0, K + 2), min_size=1, max_size=3))
LAYERS = 2  # num_hidden_layers of tiny_config: a per-layer budget has this many entries


@st.composite
def calls(draw):
    """A batch of token rows, left-padded to a common length, with a budget, a dtype and a cache split."""
    batch, seq_len = draw(st.integers(1, 3)), draw(st.integers(1, L + 3))
    padding = [draw(st.integers(0, seq_len - 1)) for _ in range(batch)]
    seed = draw(st.integers(0, 2**16))
    input_ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.stack([torch.arange(seq_len) >= p for p in padding]).long()
    return dict(input_ids=input_ids.masked_fill(attention_mask == 0, 256), attention_mask=attention_mask,
                budget=draw(budgets), dtype=draw(st.sampled_from(list(MODELS))), split=draw(st.integers(1, seq_len)))


def is_valid_budget(budget):
    if isinstance(budget, torch.Tensor):
        return not budget.is_floating_point() and is_valid_budget(budget.item() if budget.numel() == 1 else budget.tolist())
    if isinstance(budget, list):
        return len(budget) == LAYERS and all(is_valid_budget(k) for k in budget)
    return budget is None or (isinstance(budget, numbers.Integral) and not isinstance(budget, bool) and 2 <= budget <= K)


def check_call(call):
    model, budget = MODELS[call["dtype"]], call["budget"]
    input_ids, attention_mask, split = call["input_ids"], call["attention_mask"], call["split"]
    if not is_valid_budget(budget) or input_ids.shape[1] > L:
        with pytest.raises(ValueError):
            model(input_ids, attention_mask=attention_mask, spectral_budget=budget)
        return
    # bf16 rounds every layer's output: its paths agree to bf16 precision only.
    tolerance = dict(atol=1e-4, rtol=1e-4) if call["dtype"] == torch.float32 else dict(atol=0.1, rtol=0.05)
    with torch.no_grad():
        whole = model(input_ids, attention_mask=attention_mask, spectral_budget=budget).logits  # (B, T, V)
        assert torch.isfinite(whole.float()).all()
        first = model(input_ids[:, :split], attention_mask=attention_mask[:, :split], spectral_budget=budget,
                      use_cache=True)
        pieces = [first.logits]
        if split < input_ids.shape[1]:
            pieces.append(model(input_ids[:, split:], attention_mask=attention_mask, cache=first.cache,
                                spectral_budget=budget).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), whole, **tolerance)
        for row, mask, outputs in zip(input_ids, attention_mask.bool(), whole):  # left padding changes nothing
            alone = model(row[mask][None], spectral_budget=budget).logits[0]
            torch.testing.assert_close(alone, outputs[mask], **tolerance)


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=FAST_EXAMPLES, **FUZZ_SETTINGS)
@given(calls())
def test_every_call_is_exact_or_a_value_error(call):
    check_call(call)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **FUZZ_SETTINGS)
@given(calls())
def test_every_call_is_exact_or_a_value_error_many_examples(call):
    check_call(call)
