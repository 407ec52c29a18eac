import json

import pytest
from transformers import AutoTokenizer

from modeling_essm import ESSSMConfig, ESSSMTokenizer

TEXTS = ["", "plain ascii", "héllo wörld – ∑ 漢字 🙂", "a\x00b\nc\td", "</s> <pad> <s> typed in text"]


@pytest.fixture
def tokenizer():
    return ESSSMTokenizer()


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


def test_saved_tokenizer_reloads_through_auto_tokenizer_with_its_code(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["auto_map"]["AutoTokenizer"][0] == "tokenization_essm.ESSSMTokenizer"  # remote code can find it
    assert (tmp_path / "tokenization_essm.py").exists()
    ESSSMConfig().save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is ESSSMTokenizer and reloaded.padding_side == "left"
    for text in TEXTS:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
