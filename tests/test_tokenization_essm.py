import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from modeling_essm import ESSSMConfig, ESSSMTokenizer, build_fast_tokenizer

TEXTS = ["", "plain ascii", "héllo wörld – ∑ 漢字 🙂", "a\x00b\nc\td", "</s> <pad> <s> typed in text"]


@pytest.fixture(params=["python", "fast"])
def tokenizer(request):
    """Both forms: every behaviour below holds for each."""
    return ESSSMTokenizer() if request.param == "python" else build_fast_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_the_utf8_bytes_and_decode_back(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode("utf-8"))  # nothing added around the bytes, as in the byte-level tasks
    assert tokenizer.decode(ids) == text


def test_special_ids_match_the_model_config(tokenizer):
    config = ESSSMConfig()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.pad_token_id, config.bos_token_id, config.eos_token_id)
    assert len(tokenizer) == config.vocab_size == 259
    assert tokenizer.decode([104, 105, 258], skip_special_tokens=True) == "hi"
    assert tokenizer.decode([104, 105, 258]) == "hi</s>"


def test_batches_are_left_padded_with_the_pad_id(tokenizer):
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch.input_ids == [[256, 256, 97, 98], [97, 98, 99, 100]]
    assert batch.attention_mask == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_a_cut_multibyte_character_decodes_to_the_replacement_character(tokenizer):
    assert tokenizer.decode(list("é".encode("utf-8"))[:1] + [97]) == "\ufffda"


def test_saved_python_tokenizer_reloads_through_auto_tokenizer_with_its_code(tmp_path):
    tokenizer = ESSSMTokenizer()
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["auto_map"]["AutoTokenizer"][0] == "tokenization_essm.ESSSMTokenizer"  # remote code can find it
    assert (tmp_path / "tokenization_essm.py").exists()
    ESSSMConfig().save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is ESSSMTokenizer and reloaded.padding_side == "left"
    for text in TEXTS:
        assert reloaded(text).input_ids == tokenizer(text).input_ids


SLOW, FAST = ESSSMTokenizer(), build_fast_tokenizer()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text())
def test_both_forms_give_the_same_ids_and_text_for_any_text(text):
    ids = FAST(text).input_ids
    assert ids == SLOW(text).input_ids
    assert FAST.decode(ids) == SLOW.decode(ids) == text


FAST_LOADER = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])  # no trust_remote_code, no modeling_essm import
print(json.dumps([tokenizer(sys.argv[2]).input_ids, tokenizer.padding_side, tokenizer.pad_token_id]))
"""


def test_the_fast_tokenizer_loads_without_remote_code_in_a_clean_process(tmp_path):
    build_fast_tokenizer().save_pretrained(tmp_path)
    assert not (tmp_path / "tokenization_essm.py").exists()
    text = "héllo </s> 🙂"
    result = subprocess.run([sys.executable, "-c", FAST_LOADER, str(tmp_path), text], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [list(text.encode("utf-8")), "left", 256]
