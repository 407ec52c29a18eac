"""Fixtures and helpers shared by the generation tests (test_generation.py, test_speculative.py)."""

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from modeling_essm import ESSSMForCausalLM

K = 16  # num_spectral_filters of tiny_config
L = 128  # its max_position_embeddings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, whose OpenMP spin-waits cost ~5x on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    # Weights 5x the default init make the logits depend strongly on the context: a cache that loses or mixes up
    # history is off by ~1e-2, four orders above the float error of a correct one.
    return ESSSMForCausalLM(tiny_config(initializer_range=0.1)).eval()


def tokens(batch=2, seq_len=40, seed=0):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def left_pad(rows, pad_id):
    """Left-pad rows of token ids (1, T_i) into a batch with its attention mask."""
    width = max(row.shape[1] for row in rows)
    ids = torch.cat([torch.nn.functional.pad(row, (width - row.shape[1], 0), value=pad_id) for row in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(row), (width - row.shape[1], 0)) for row in rows])
    return ids, mask


def record_budgets(model):
    """The spectral_budget of every forward call of `model`, and the hook handle that records them."""
    budgets = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: budgets.append(kwargs.get("spectral_budget")),
                                             with_kwargs=True)
    return budgets, handle


def greedy(model, inputs=None, **kwargs):
    """Greedy generation of exactly max_new_tokens (no stop at eos), with the logits of every step."""
    return model.generate(inputs, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True,
                          **kwargs)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=0)
