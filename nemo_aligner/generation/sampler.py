"""The built-in generation engine: batched KV-cache decoding on our own GPTModel.

    sampler = Sampler(model, tokenizer, eos_token_ids=eos_ids)          # one process
    sampler = Sampler.for_run(run, tokenizer, eos_ids)                  # a training run's policy, any tp
    completions = sampler.generate(prompt_token_ids, SamplingParams(temperature=0.7, num_samples=4))

Each batch of prompts is left-padded to one width and prefilled once (a prompt's samples then share its
cache rows), then decoded a token at a time (`GPTModel.decode`: padding is never attended to, each layer
keeps its window, soft-caps and RoPE table). A row stops at any stop token id (the model's end-of-sequence
ids unless the params name others), at a stop string, or after max_new_tokens; rows that finish are
dropped from the batch once half of it is done. It runs the live model: LoRA adapters on or off as the
model has them (`models.lora.adapters_disabled`), tensor-parallel shards as training laid them out, so
`sync_weights` has nothing to copy. Under FSDP the weights are gathered once per `generate` call.
"""

import contextlib

import numpy as np
import torch

from nemo_aligner.generation.params import Completion, SamplingParams
from nemo_aligner.generation.sampling import choose_tokens
from nemo_aligner.losses.logprobs import softcap
from nemo_aligner.models.layers.attention import KVCache
from nemo_aligner.parallel.generation import broadcast_from_first, check_generation_layout, full_logits, unsharded


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of completion (prompt_index, sample_index): independent of batch size and order."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, np.uint64)[0] >> 1)


class _Row:
    """One completion being decoded: its tokens, log-probs, generator and why it stopped."""

    def __init__(self, prompt_index: int, sample_index: int, params: SamplingParams, limit: int):
        self.prompt_index, self.sample_index, self.limit = prompt_index, sample_index, limit
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator().manual_seed(row_seed(params.seed, prompt_index, sample_index))
        self.ids, self.logprobs = [], []
        self.finish_reason, self.stop_reason, self.cut = None, None, None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64)) if not self.done else 0.5

    def add(self, token: int, logprob: float, stops: set, stop_strings: tuple, tokenizer) -> None:
        self.ids.append(token)
        self.logprobs.append(logprob)
        if token in stops:
            self.finish_reason, self.stop_reason = "stop", token
        elif stop_strings:
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            found = [(text.find(s), s) for s in stop_strings if s in text]
            if found:
                self.cut, self.stop_reason = min(found)
                self.finish_reason = "stop"
        if not self.done and len(self.ids) >= self.limit:
            self.finish_reason = "length"

    def completion(self, tokenizer) -> Completion:
        text = tokenizer.decode(self.ids, skip_special_tokens=True) if tokenizer is not None else ""
        if self.cut is not None:
            text = text[:self.cut]
        return Completion(self.prompt_index, self.sample_index, self.ids, text, self.logprobs, self.finish_reason,
                          self.stop_reason)


class Sampler:
    """GenerationEngine over a GPTModel (whole, or tensor-parallel shards with `tp_group`).

    eos_token_ids: what stops a completion unless SamplingParams.stop_token_ids says otherwise (the
    tokenizer's EOS and generation_config.json's: `generation.prompts.eos_token_ids`). batch_size: rows
    decoded together (a prompt's num_samples rows always share a batch)."""

    def __init__(self, model, tokenizer=None, eos_token_ids=(), *, batch_size: int = 32, tp_group=None,
                 device=None, autocast=None, fsdp_module=None):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer")
        self.model, self.tokenizer, self.eos_token_ids = model, tokenizer, tuple(int(t) for t in eos_token_ids)
        self.batch_size, self.tp_group = batch_size, tp_group
        self.device = device or next(model.parameters()).device
        self.autocast = autocast or contextlib.nullcontext()
        self.fsdp_module = fsdp_module  # the FSDP root to gather around each generate call (dp > 1)

    @classmethod
    def for_run(cls, run, tokenizer=None, eos_token_ids=(), batch_size: int = 32, autocast=None) -> "Sampler":
        """A sampler on a ParallelRun's policy, laid out as training laid it out (tp shards, FSDP units)."""
        dims = run.parallel.dims
        check_generation_layout(dims)
        return cls(run.model, tokenizer, eos_token_ids, batch_size=batch_size, device=run.parallel.device,
                   tp_group=run.parallel.group("tp") if dims.tp > 1 else None, autocast=autocast,
                   fsdp_module=run.policy if dims.dp > 1 else None)

    def sync_weights(self, model=None) -> None:
        """Nothing to copy: the sampler runs the live model. Passing another model switches to it."""
        if model is not None:
            self.model = model

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, first_index: int = 0
                 ) -> list[Completion]:
        """first_index: the index of the first prompt (prompt_index and seeds count from it), so a prompt list
        split into calls (progress, data-parallel shares) samples what one call would."""
        prompts = [self._checked_prompt(first_index + i, p) for i, p in enumerate(prompt_token_ids)]
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs a Sampler built with a tokenizer")
        out = []
        was_training = self.model.training
        self.model.eval()  # no dropout (LoRA's) while sampling
        gathered = unsharded(self.fsdp_module) if self.fsdp_module is not None else contextlib.nullcontext()
        try:
            with torch.no_grad(), gathered, self.autocast:
                for group in self._batches([len(p) for p in prompts], params.num_samples):
                    out.extend(self._generate_batch([first_index + i for i in group], [prompts[i] for i in group],
                                                    params))
        finally:
            self.model.train(was_training)
        return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))

    def _checked_prompt(self, index: int, ids) -> list[int]:
        ids = [int(t) for t in ids]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError(f"prompt {index} has no tokens; a completion needs at least one token before it")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the model's vocabulary [0, {vocab})")
        limit = self._context_limit()
        if limit is not None and len(ids) >= limit:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the model's max_position_embeddings={limit} "
                             "leaves no room for a completion")
        return ids

    def _context_limit(self) -> int | None:
        """Learned absolute positions (GPT-2) end at max_position_embeddings; RoPE models have no hard end."""
        cfg = self.model.config
        return cfg.max_position_embeddings if cfg.position_embedding_type == "learned_absolute" else None

    def _batches(self, lengths: list[int], num_samples: int) -> list[list[int]]:
        """Prompt indices per batch, prompts of similar length together (less padding); seeds follow the
        prompt index, so the grouping changes no completion."""
        per_batch = max(1, self.batch_size // num_samples)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[s:s + per_batch] for s in range(0, len(order), per_batch)]

    def _logits(self, hidden_BE: torch.Tensor) -> torch.Tensor:
        logits_BV = full_logits(hidden_BE, self.model.output_weight)
        return softcap(logits_BV, self.model.config.final_logit_softcapping)

    def _prefill(self, prompts: list[list[int]], num_slots: int) -> tuple[KVCache, torch.Tensor]:
        """The prompts left-padded and run once: (their cache, the last token's hidden state [U, E])."""
        width = max(len(p) for p in prompts)
        ids_UP = torch.zeros(len(prompts), width, dtype=torch.long)
        valid_UP = torch.zeros(len(prompts), width, dtype=torch.bool)
        for u, prompt in enumerate(prompts):
            ids_UP[u, width - len(prompt):] = torch.tensor(prompt)
            valid_UP[u, width - len(prompt):] = True
        cache = KVCache(len(prompts), num_slots, self.device)
        hidden_UPE = self.model.decode(ids_UP.to(self.device), valid_UP.to(self.device), cache)
        return cache, hidden_UPE[:, -1]

    def _generate_batch(self, prompt_indices: list[int], prompts: list[list[int]], params: SamplingParams):
        S, max_new = params.num_samples, params.max_new_tokens
        limit = self._context_limit()
        rows = [_Row(i, j, params, max_new if limit is None else min(max_new, limit - len(p)))
                for i, p in zip(prompt_indices, prompts) for j in range(S)]
        width = max(len(p) for p in prompts)
        cache, hidden_BE = self._prefill(prompts, width + max(r.limit for r in rows) - 1)
        if S > 1:  # each prompt's prefill shared by its samples
            expand_B = torch.arange(len(prompts), device=self.device).repeat_interleave(S)
            cache.keep_rows(expand_B)
            hidden_BE = hidden_BE[expand_B]
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        live = list(range(len(rows)))  # the row of each cache row
        while True:
            uniforms_B = None if params.greedy else torch.tensor([rows[r].uniform() for r in live], dtype=torch.float64)
            tokens_B, logps_B = choose_tokens(self._logits(hidden_BE), params.temperature, params.top_k,
                                              params.top_p, uniforms_B)
            tokens_B = broadcast_from_first(tokens_B.contiguous(), self.tp_group)
            for r, token, logp in zip(live, tokens_B.tolist(), logps_B.tolist()):
                if not rows[r].done:
                    rows[r].add(token, logp, stops, params.stop, self.tokenizer)
            still = [k for k, r in enumerate(live) if not rows[r].done]
            if not still:
                break
            if len(still) <= len(live) // 2:  # drop finished rows once they are half the batch
                keep_B = torch.tensor(still, device=self.device)
                cache.keep_rows(keep_B)
                live, tokens_B = [live[k] for k in still], tokens_B[keep_B]
            ones_B1 = torch.ones(len(live), 1, dtype=torch.bool, device=self.device)
            hidden_BE = self.model.decode(tokens_B[:, None], ones_B1, cache)[:, -1]
        return [row.completion(self.tokenizer) for row in rows]
