"""Byte-level tokenizer of ES-SSM: token id = UTF-8 byte value (0-255), then pad 256, bos 257 and eos 258.

The ids match ESSSMConfig's defaults and the byte-level tasks, which train on plain bytes: nothing is added
around a text unless asked for. No vocabulary file is needed, so it works offline.

Two forms with the same ids: `build_fast_tokenizer()`, a `tokenizers` (Rust) tokenizer saved as tokenizer.json,
which a plain `AutoTokenizer.from_pretrained(folder)` loads without remote code (what the training and push
commands save), and `ESSSMTokenizer`, the Python class, which loads through remote code.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AddedToken, PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

NUM_BYTES = 256
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 256, 257, 258


def build_fast_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer in Rust: the same ids and decoding as `ESSSMTokenizer`, loadable without remote code."""
    # tokenizers' ByteLevel pre-tokenizer spells byte b as the printable character bytes_to_unicode()[b];
    # a vocabulary mapping that character back to b makes every id the byte value.
    vocabulary = {character: byte for byte, character in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS.values()])
    # Left padding for decoder-only models; a text is always its bytes ("</s>" typed in a text is five bytes).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", split_special_tokens=True,
                                   **SPECIAL_TOKENS)


class ESSSMTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as tokens (each a one-character string chr(byte)), three special tokens after them."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, pad_token=SPECIAL_TOKENS["pad_token"], bos_token=SPECIAL_TOKENS["bos_token"],
                 eos_token=SPECIAL_TOKENS["eos_token"], padding_side="left",
                 split_special_tokens=True, **kwargs):
        # The specials sit right after the bytes, at the ids the model config expects. Decoder-only models pad on the
        # left, and a text is always its bytes: "</s>" typed in a text is five bytes, not the eos token.
        specials = (pad_token, bos_token, eos_token)
        self._added_tokens_decoder = {
            NUM_BYTES + i: token if isinstance(token, AddedToken) else AddedToken(token, special=True)
            for i, token in enumerate(specials)
        }
        super().__init__(pad_token=pad_token, bos_token=bos_token, eos_token=eos_token, padding_side=padding_side,
                         split_special_tokens=split_special_tokens, **kwargs)

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(NUM_BYTES)} | self.added_tokens_encoder

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(byte) for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Specials are whole strings, bytes single characters; a cut-off multi-byte character decodes to U+FFFD.
        data = b"".join(token.encode("utf-8") if len(token) > 1 else bytes([ord(token)]) for token in tokens)
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 byte values


__all__ = ["ESSSMTokenizer", "build_fast_tokenizer"]
