"""Reward-model scoring for the online trainers (GRPO, PPO): a reward model loaded frozen, laid out like
the policy, scoring token sequences with one float each.

    scorer = RewardModel.load("/results/rm/hf", run=policy_run)   # in-process, sharded like the policy
    scores = scorer.score(prompt_ids, completion_ids)              # [N] float32, one per (prompt, completion)
    scores = RewardModel.load("/results/rm/hf").score(sequences)   # one process, its own run

`load` reads a `<Family>ForSequenceClassification` folder (ours or one trained elsewhere), or a PEFT
SEQ_CLS folder (adapters + head over their base), as a `models.score.ScoreModel`; a folder without a
trained head is refused; with a policy's `ParallelRun` it is laid out like the policy
(`ParallelRun.wrap_frozen`: pipeline stage, tensor-parallel shards, FSDP over dp) and runs through the
policy's executor. The score of a sequence is the head's output at its last token that is not the pad
id (transformers' rule, and the position training reads: `data.scores`). Token ids are the reward
model's tokenizer's (the policy's when they share one).

Distributed: each rank passes its own data-parallel rank's sequences (the same ones on its tp / pp
peers) and gets their scores; a rank with fewer micro-batches repeats one, so every rank runs as many
forwards as the busiest (FSDP's collectives need it). Under pipeline parallel a sequence must fit the
run's fixed row length. Sequences are scored a micro-batch at a time, longest first (little padding),
and returned in the order given.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from nemo_aligner.data.scores import collate_sequences, sequence_scores
from nemo_aligner.models.hf import load_pretrained
from nemo_aligner.models.hf.common import weight_files
from nemo_aligner.models.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SCORE_KEY, load_adapters
from nemo_aligner.models.score import SEQUENCE_CLASSIFICATION, ScoreHead
from nemo_aligner.parallel.mesh import Parallel
from nemo_aligner.parallel.run import ParallelRun, stage_pruner

log = logging.getLogger("nemo_aligner")


class RewardModel:
    """A frozen score model and the executor that runs it; `score` gives one float per sequence."""

    def __init__(self, module, executor, dp, pad_id: int, micro_batch_size: int = 8):
        self.module, self.executor, self.dp = module, executor, dp
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size

    @classmethod
    def load(cls, path, run: ParallelRun | None = None, *, pad_id: int | None = None, micro_batch_size: int = 8,
             head_dtype: torch.dtype | None = torch.float32, dtype="fp32") -> "RewardModel":
        """The reward model at `path`, frozen. run: the policy's run (laid out like it) or None (one process).
        pad_id: the id padding is made of and the score position skips; None = config.json's pad_token_id."""
        parallel = run.parallel if run is not None else Parallel()
        model = _load_frozen_weights(Path(path), dtype, parallel)
        pad_id = pad_id if pad_id is not None else model.pad_token_id
        if pad_id is None:
            raise ValueError(f"{path}/config.json has no pad_token_id; pass pad_id (the tokenizer's) so the score "
                             "is read at each sequence's last non-pad token")
        if run is None:  # a run of its own: the reward model is its "policy", frozen
            run = ParallelRun(parallel, model, ScoreHead(head_dtype))
            module = run.policy.requires_grad_(False).eval()
        else:
            module = run.wrap_frozen(model, ScoreHead(head_dtype))
        log.info("reward model %s loaded frozen (%s parameters%s)", path, f"{model.num_parameters():,}",
                 ", this rank's shard" if parallel.distributed else "")
        return cls(module, run.executor, run.dp, pad_id, micro_batch_size)

    @torch.no_grad()
    def score(self, sequences, completions=None) -> torch.Tensor:
        """[N] float32 on CPU: the score of each token sequence, or with `completions` of each
        prompt + completion (sequences are then the prompts' token ids)."""
        if completions is not None:
            if len(completions) != len(sequences):
                raise ValueError(f"{len(sequences)} prompts but {len(completions)} completions")
            sequences = [list(p) + list(c) for p, c in zip(sequences, completions)]
        sequences = [list(map(int, s)) for s in sequences]
        for k, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"sequence {k} has no tokens")
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        chunks = [order[i:i + self.micro_batch_size] for i in range(0, len(order), self.micro_batch_size)]
        batches = [collate_sequences([sequences[i] for i in chunk], self.pad_id) for chunk in chunks]
        num_real = len(batches)
        filler = batches[:1] or [collate_sequences([[self.pad_id]], self.pad_id)]
        batches += filler * (self.dp.all_reduce_max(num_real) - num_real)
        results = self.executor.forward_only(self.module, batches,
                                             lambda batch, out: sequence_scores(batch, out, batch.num_sequences))
        out = torch.zeros(len(sequences), dtype=torch.float32)
        for chunk, values in zip(chunks, results[:num_real]):
            out[torch.as_tensor(chunk, dtype=torch.long)] = values.float().cpu()
        return out

    __call__ = score


def _load_frozen_weights(path: Path, dtype, parallel):
    """A reward model's folder (full, or PEFT adapters + head over their base) as a ScoreModel stage. A folder
    without a trained head is refused: a fresh head would score at random."""
    adapters = path / ADAPTER_CONFIG
    base = Path(json.loads(adapters.read_text())["base_model_name_or_path"]) if adapters.is_file() else path
    model = load_pretrained(base, dtype=dtype, device=parallel.device, prune=stage_pruner(parallel),
                            task=SEQUENCE_CLASSIFICATION)
    if adapters.is_file():
        with safe_open(path / ADAPTER_WEIGHTS, "pt") as f:
            has_head = SCORE_KEY in f.keys()
        if not has_head:
            raise ValueError(f"{path}: a PEFT folder without a score head ({SCORE_KEY}); not a reward model")
        load_adapters(model, path)
    elif "score.weight" not in weight_files(path):
        raise ValueError(f"{path}: no score.weight, so not a reward model (a causal LM?); point at the hf/ folder "
                         "of train_reward_model.py or any *ForSequenceClassification checkpoint")
    return model
