"""Byte-level tokenizer of ES-SSM: token id = UTF-8 byte value (0-255), then pad 256, bos 257 and eos 258.

The ids match ESSSMConfig's defaults and the byte-level tasks, which train on plain bytes: nothing is added
around a text unless asked for. No vocabulary file is needed, so it works offline and a saved model folder
carries it (tokenizer_config.json, plus this file for remote code).
"""

from transformers import AddedToken, PreTrainedTokenizer

NUM_BYTES = 256


class ESSSMTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as tokens (each a one-character string chr(byte)), three special tokens after them."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left",
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


__all__ = ["ESSSMTokenizer"]
