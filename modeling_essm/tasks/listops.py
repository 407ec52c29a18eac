"""ListOps, generated with the rules of Long Range Arena (Tay et al. 2021, after Nangia &
Bowman 2018): nested MIN / MAX / MED / SM expressions over digits, label = the value (0-9).

A tree grows from depth 1; below depth 10 a node is a digit with probability 0.75, otherwise
a uniformly chosen operator with 2..10 children; at depth 10 it is a digit. Its length counts
digits, operators and closing brackets. Trees are de-duplicated (also across train and eval)
and kept when min_length <= length <= max_length. LRA keeps 500 < length < 2000; the default
window here, 100..500, keeps the rules but suits CPU-sized runs.

Tokens: pad 0, digits 0-9 as 1-10, "[MIN" "[MAX" "[MED" "[SM" as 11-14 (operator and its
opening bracket are one token, as in LRA), "]" as 15.
"""

import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ._common import TaskData, check_max_length, check_positive_int, labelled_dataset


def _median(values):
    # MED of an even count: mean of the two middle values, truncated (LRA: int(np.median)).
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2


OPERATORS = {"[MIN": min, "[MAX": max, "[MED": _median, "[SM": lambda values: sum(values) % 10}
VALUES = tuple(str(d) for d in range(10))  # digits, and the label names
VOCAB = ("<pad>", *VALUES, *OPERATORS, "]")
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}
PAD_ID = 0
CLOSE_ID = TOKEN_IDS["]"]
_OPERATOR_BY_ID = {TOKEN_IDS[name]: fn for name, fn in OPERATORS.items()}
_OPERATOR_IDS = tuple(_OPERATOR_BY_ID)
_FIRST_DIGIT_ID = TOKEN_IDS["0"]

MAX_DEPTH = 10
MAX_ARGS = 10
LEAF_PROBABILITY = 0.75
DEFAULT_MIN_LENGTH = 100
DEFAULT_MAX_LENGTH = 500
LENGTH_LIMIT = 4096  # longest window accepted; LRA's longest is 2000
SHORTEST_MIN_LENGTH = 20  # shorter windows hold too few distinct trees to de-duplicate into a split
DEFAULT_TRAIN_SIZE = 20_000
DEFAULT_EVAL_SIZE = 2_000


def encode(expression: str) -> list[int]:
    """'[MAX 2 9 [MIN 4 7 ] 0 ]' -> token ids."""
    return [TOKEN_IDS[token] for token in expression.split()]


def decode(input_ids) -> str:
    return " ".join(VOCAB[i] for i in input_ids if i != PAD_ID)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The vocabulary as a tokenizer of space-separated expressions (as `encode` reads them), so that a saved
    ListOps model reads '[MAX 2 9 [MIN 4 7 ] 0 ]' as text; a token outside the vocabulary is an error."""
    tokenizer = Tokenizer(models.WordLevel(vocab=TOKEN_IDS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=VOCAB[PAD_ID], padding_side="right")


def evaluate(input_ids) -> int:
    """Value of an expression given as token ids (see `encode`); padding is ignored."""
    frames = [[]]  # argument lists of the open operators, outermost first
    operators = []
    for token in input_ids:
        if token == PAD_ID:
            continue
        if token in _OPERATOR_BY_ID:
            operators.append(_OPERATOR_BY_ID[token])
            frames.append([])
        elif token == CLOSE_ID:
            if not operators or not frames[-1]:
                raise ValueError("unbalanced ']' or operator without arguments")
            arguments = frames.pop()
            frames[-1].append(operators.pop()(arguments))
        else:
            frames[-1].append(token - _FIRST_DIGIT_ID)
    if operators or len(frames[0]) != 1:
        raise ValueError("not a single complete expression")
    return frames[0][0]


class _TooLong(Exception):
    pass


def _grow(rng: random.Random, depth: int, tokens: list, max_length: int) -> int:
    """Append one random subtree to `tokens` and return its value. Gives up as soon as the
    tree passes max_length: it would be rejected anyway, and the big trees of this branching
    process are where rejection sampling spends its time. (`int(random() * n)` rather than
    `randrange(n)`: same distribution, a third of the cost.)"""
    if depth >= MAX_DEPTH or rng.random() < LEAF_PROBABILITY:
        digit = int(rng.random() * 10)
        tokens.append(_FIRST_DIGIT_ID + digit)
        if len(tokens) > max_length:
            raise _TooLong
        return digit
    operator_id = _OPERATOR_IDS[int(rng.random() * len(_OPERATOR_IDS))]
    tokens.append(operator_id)
    num_children = 2 + int(rng.random() * (MAX_ARGS - 1))
    values = [_grow(rng, depth + 1, tokens, max_length) for _ in range(num_children)]
    tokens.append(CLOSE_ID)
    if len(tokens) > max_length:
        raise _TooLong
    return _OPERATOR_BY_ID[operator_id](values)


def generate(num_samples: int, min_length: int, max_length: int, rng: random.Random, seen: set):
    """`num_samples` distinct (input_ids, value) pairs not already in `seen` (which is updated)."""
    samples = []
    while len(samples) < num_samples:
        tokens = []
        try:
            value = _grow(rng, 1, tokens, max_length)
        except _TooLong:
            continue
        key = bytes(tokens)
        if len(tokens) >= min_length and key not in seen:
            seen.add(key)
            samples.append((tokens, value))
    return samples


def load(
    data_dir=None, max_length=None, train_size=None, eval_size=None, seed=0, min_length=DEFAULT_MIN_LENGTH
) -> TaskData:
    """ListOps splits of `train_size` (default 20,000) and `eval_size` (default 2,000) trees.
    `data_dir` is unused: the data is generated. The eval split is drawn first, so it stays
    the same for a given seed and eval_size whatever train_size is."""
    max_length = check_max_length("listops", max_length, SHORTEST_MIN_LENGTH, LENGTH_LIMIT, DEFAULT_MAX_LENGTH)
    check_positive_int("min_length", min_length, allow_none=False)
    if not SHORTEST_MIN_LENGTH <= min_length <= max_length:
        raise ValueError(f"min_length must be in [{SHORTEST_MIN_LENGTH}, max_length={max_length}], got {min_length}")
    rng, seen = random.Random(seed), set()
    splits = {}
    for split, size in (("eval", eval_size or DEFAULT_EVAL_SIZE), ("train", train_size or DEFAULT_TRAIN_SIZE)):
        samples = generate(size, min_length, max_length, rng, seen)
        splits[split] = labelled_dataset([t for t, _ in samples], [v for _, v in samples], VALUES)
    return TaskData(
        name="listops",
        train=splits["train"],
        eval=splits["eval"],
        num_labels=10,
        vocab_size=len(VOCAB),
        input_size=None,
        pad_token_id=PAD_ID,
        max_length=max_length,
        metric="accuracy",
        label_names=VALUES,
        build_tokenizer=build_tokenizer,
    )
