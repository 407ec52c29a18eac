"""Self-speculative decoding for ES-SSM: the model drafts at a small spectral budget and verifies at its own.

Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative Decoding") lets a
cheap draft model propose a few tokens, scores them all with the target model in one forward pass, and keeps the
longest prefix the target agrees with plus one token of the target's own; greedy outputs are unchanged, and
speculative sampling keeps the target's distribution. An elastic model carries its own draft: the same weights at
a budget k < K compute only k of the K spectral channels. The target's cache is cut back past rejected drafts
(`ESSSMCache.crop`); transformers' assisted decoding runs the rounds, this module supplies the drafts.

The draft needs a cache of its own, since it appends its drafts, but not a prefill of its own: it takes over the
target's histories of the verified tokens (`ESSSMCache.follow`) and continues them at its budget. That saves a
forward pass over the whole prompt, which at long contexts costs as much as the drafting saves.
"""

import torch
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList, MinLengthLogitsProcessor

from .cache_essm import ESSSMCache

# Drafts per round unless `num_assistant_tokens` says otherwise. transformers' default of 20 suits a draft model
# many times cheaper than its target; a step at budget 4 or 8 costs 0.4-0.5x of one at 32, and with 85-93% of its
# tokens accepted, 3 drafts per round decoded fastest (docs/generation.md, "Speculative decoding").
DEFAULT_DRAFT_TOKENS = 3


class ESSSMDraftCandidateGenerator(CandidateGenerator):
    """Drafts candidate tokens with the verifying model itself at `generation_config.draft_budget`.

    Args:
        model: the ESSSMForCausalLM that verifies.
        generation_config: the call's; its `draft_budget`, `num_assistant_tokens` (ESSSMForCausalLM sets
            DEFAULT_DRAFT_TOKENS unless asked otherwise),
            `num_assistant_tokens_schedule` ("constant", or "heuristic" / "heuristic_transient": transformers' rule of
            two more drafts after a round that was accepted whole, one fewer otherwise, here for this call only),
            `do_sample` and `max_length` are used.
        logits_processor: the call's processors; the drafts are chosen from the processed scores, as the verifying
            step's tokens are, and those scores are what speculative sampling compares.
        target_cache: the ESSSMCache the verifying forward passes fill; the draft reads the verified tokens' histories
            from it.
    """

    def __init__(self, model, generation_config, logits_processor: LogitsProcessorList, target_cache: ESSSMCache):
        self.model = model
        self.draft_budget = generation_config.draft_budget
        self.num_tokens = generation_config.num_assistant_tokens
        self.adaptive = generation_config.num_assistant_tokens_schedule in ("heuristic", "heuristic_transient")
        self.do_sample = generation_config.do_sample
        self.max_length = generation_config.max_length
        # A minimum length is enforced on the verified tokens; applied to drafts it would only distort them.
        self.logits_processor = LogitsProcessorList(
            processor for processor in logits_processor if not isinstance(processor, MinLengthLogitsProcessor)
        )
        self.target_cache = target_cache
        self.cache = ESSSMCache(model.config)
        self.followed = 0  # the draft cache's first positions, copied from the target's

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """input_ids (1, t) -> (1, t + n) with n drafts appended, and their processed scores (1, n, V)."""
        verified = self.target_cache.get_seq_length()
        count = min(int(self.num_tokens), self.max_length - input_ids.shape[1] - 1)
        if count <= 0 or verified == 0:  # nothing to draft from before the target's prefill: a plain first step
            return input_ids, None
        # The tokens verified since the last round replace the drafts made for them.
        self.cache.follow(self.target_cache, self.followed, self.model.config.layer_budgets(self.draft_budget))
        self.followed = verified
        # The drafts only propose, so they ignore any attention mask: a mask of a single row can only zero its
        # left end, and the verifying forward applies it.
        new_ids = input_ids[:, verified:]
        ids, scores = input_ids, []
        for _ in range(count):
            logits = self.model(new_ids, cache=self.cache, spectral_budget=self.draft_budget, logits_to_keep=1).logits
            score = self.logits_processor(ids, logits[:, -1].float())  # (1, V)
            token = torch.multinomial(score.softmax(-1), 1) if self.do_sample else score.argmax(-1, keepdim=True)
            ids, new_ids = torch.cat([ids, token], 1), token
            scores.append(score)
        return ids, torch.stack(scores, 1)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        drafted = scores.shape[1] - 1
        if self.adaptive and drafted:
            self.num_tokens = self.num_tokens + 2 if num_matches == drafted else max(1, self.num_tokens - 1)


__all__ = ["DEFAULT_DRAFT_TOKENS", "ESSSMDraftCandidateGenerator"]
