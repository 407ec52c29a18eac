"""Self-speculative decoding for ES-SSM: the model drafts at a small spectral budget and verifies at its own.

Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative Decoding") lets a
cheap draft model propose a few tokens, scores them all with the target model in one forward pass, and keeps the
longest prefix the target agrees with plus one token of the target's own; greedy outputs are unchanged, and
speculative sampling keeps the target's distribution. An elastic model carries its own draft: the same weights at
a budget k < K compute only k of the K spectral channels. The draft needs a cache of its own, since every block's
input above the first depends on the budget; the target's cache is cut back past rejected drafts
(`ESSSMCache.crop`). transformers' assisted decoding runs the rounds; this module only supplies the drafts.
"""

import torch
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList, MinLengthLogitsProcessor

from .cache_essm import ESSSMCache

# Drafts per round unless `num_assistant_tokens` says otherwise. transformers' default of 20 suits a draft model
# that is many times cheaper than its target; a small budget of the same model costs about 0.4x of the full one.
DEFAULT_DRAFT_TOKENS = 4


class ESSSMDraftCandidateGenerator(CandidateGenerator):
    """Drafts candidate tokens with the verifying model itself at `generation_config.draft_budget`.

    Args:
        model: the ESSSMForCausalLM that verifies.
        generation_config: the call's; its `draft_budget`, `num_assistant_tokens` (default DEFAULT_DRAFT_TOKENS),
            `num_assistant_tokens_schedule` ("constant", or "heuristic" / "heuristic_transient": transformers' rule of
            two more drafts after a round that was accepted whole, one fewer otherwise, here for this call only),
            `do_sample` and `max_length` are used.
        logits_processor: the call's processors; the drafts are chosen from the processed scores, as the verifying
            step's tokens are, and those scores are what speculative sampling compares.
    """

    def __init__(self, model, generation_config, logits_processor: LogitsProcessorList):
        self.model = model
        self.draft_budget = generation_config.draft_budget
        self.num_tokens = generation_config.num_assistant_tokens or DEFAULT_DRAFT_TOKENS
        self.adaptive = generation_config.num_assistant_tokens_schedule in ("heuristic", "heuristic_transient")
        self.do_sample = generation_config.do_sample
        self.max_length = generation_config.max_length
        # A minimum length is enforced on the verified tokens; applied to drafts it would only distort them.
        self.logits_processor = LogitsProcessorList(
            processor for processor in logits_processor if not isinstance(processor, MinLengthLogitsProcessor)
        )
        self.cache = ESSSMCache(model.config)
        self.cached_ids = None  # (1, t): the tokens self.cache holds

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """input_ids (1, t) -> (1, t + n) with n drafts appended, and their processed scores (1, n, V)."""
        count = min(int(self.num_tokens), self.max_length - input_ids.shape[1] - 1)
        if count <= 0:
            return input_ids, None
        # The drafts only propose, so they ignore any attention mask: a mask of a single row can only zero its
        # left end, and the verifying forward applies it.
        new_ids = input_ids[:, self.keep_verified(input_ids) :]
        ids, scores = input_ids, []
        for _ in range(count):
            logits = self.model(new_ids, cache=self.cache, spectral_budget=self.draft_budget, logits_to_keep=1).logits
            score = self.logits_processor(ids, logits[:, -1].float())  # (1, V)
            token = torch.multinomial(score.softmax(-1), 1) if self.do_sample else score.argmax(-1, keepdim=True)
            ids, new_ids = torch.cat([ids, token], 1), token
            scores.append(score)
        self.cached_ids = ids[:, :-1]  # the last draft was never fed
        return ids, torch.stack(scores, 1)

    def keep_verified(self, input_ids: torch.LongTensor) -> int:
        """Crop the draft cache to its longest prefix that input_ids confirms (never all of them); return its length."""
        if self.cached_ids is None:
            return 0
        held = self.cached_ids.shape[1]
        length = min(held, input_ids.shape[1] - 1)  # at least one token is fed, for the next draft's logits
        agree = (self.cached_ids[0, :length] == input_ids[0, :length]).int()
        keep = length if bool(agree.all()) else int(agree.argmin())  # up to the first rejected draft
        self.cache.crop(keep - held)
        return keep

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        if self.adaptive:
            accepted_all = num_matches == scores.shape[1] - 1
            self.num_tokens = self.num_tokens + 2 if accepted_all else max(1, self.num_tokens - 1)


__all__ = ["ESSSMDraftCandidateGenerator"]
