import os

import pytest
import torch

# Filters computed by the tests go to a throw-away cache, never the user's.
os.environ.setdefault("ESSM_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The commands under test read it; one exported in the shell would switch the session's allocator for good.
os.environ.pop("ESSM_REUSE_FREED_MEMORY", None)
torch.set_num_threads(min(2, torch.get_num_threads()))

import modeling_essm  # noqa: E402  (registers the Auto classes)


@pytest.fixture(autouse=True)
def restore_thread_count():
    """Benchmark entry points under test (bench_speculative.main, bench_training_speed's step) set one thread for
    their process, which here is the test session's: every later test would run on one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    """A model small enough for exhaustive checks on 2 CPU cores, with every component enabled."""
    settings = dict(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_spectral_filters=16,
                    max_position_embeddings=128, intermediate_size=64, spectral_chunk_size=3,
                    # Projections of the old default size (the paper's 1e-3 is 20x smaller), so that the spectral
                    # path moves the outputs enough for the exactness tests to see any error in it.
                    spectral_proj_init_std=0.02, local_conv_size=4,
                    # Training saves a few channels' convolutions for backward and recomputes the others (4 saved
                    # at batch 2 and 48 tokens), so that both paths run in every test that trains.
                    spectral_saved_mb=0.05)
    settings.update(overrides)
    return modeling_essm.ESSSMConfig(**settings)


def save_explorable_lm(folder):
    """A tiny LM saved in `folder` with its byte tokenizer and a budget sweep beside it (made-up quality: 3 - k/10
    bits per byte at k = 2, 4, 8, 16), as the explorer finds a trained one; returns the model."""
    from modeling_essm.evaluation import write_report

    torch.manual_seed(0)
    model = modeling_essm.ESSSMForCausalLM(tiny_config())
    model.save_pretrained(folder)
    modeling_essm.build_fast_tokenizer().save_pretrained(folder)
    rows = [{"budget": k, "bits_per_byte": 3.0 - k / 10, "loss": 2.0, "parameters": model.num_parameters_at_budget(k),
             "tokens_per_second": 100.0} for k in (2, 4, 8, 16)]
    write_report(rows, folder, {"model_dir": str(folder), "task": "made up", "eval_samples": 1})
    return model


@pytest.fixture
def stand_in_shakespeare(tmp_path, monkeypatch):
    """A data folder whose Tiny Shakespeare is a short stand-in, set as $ESSM_DATA_DIR: tests of the language-model
    task's plumbing then run without the shared data."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "tinyshakespeare.txt").write_bytes(b"To be, or not to be, that is the question:\n" * 400)
    monkeypatch.setenv("ESSM_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def causal_lm(config):
    torch.manual_seed(0)
    return modeling_essm.ESSSMForCausalLM(config).eval()
