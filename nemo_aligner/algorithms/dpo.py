"""One DPO-family micro-batch: policy log-probs, reference log-probs, weighted loss and metric sums.

The loop owns accumulation and the optimiser; this file owns what a pair contributes. Losses are
normalised by the number of pairs in the *global* batch (passed in), so micro-batch size,
accumulation, packing and data parallel never reweight pairs. Metrics are returned as sums over
pairs so they can be added across micro-batches and ranks and divided once.
"""

import copy
from dataclasses import dataclass

import numpy as np
import torch

from nemo_aligner.config.schema import DPOConfig
from nemo_aligner.data.collate import PreferenceBatch, collate_packed, collate_padded
from nemo_aligner.losses.logprobs import sequence_logprobs, sequence_sums
from nemo_aligner.models.lora import adapters_disabled, set_adapters_enabled
from nemo_aligner.losses.preference import (
    LOSS_TYPES, REFERENCE_FREE_LOSSES, combined_preference_loss, sft_loss_from_logps,
)

# NeMo-Aligner's metric names (train/ and val/ prefixes are added by the loop) plus TRL's.
MEAN_METRICS = ("loss", "preference_loss", "sft_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean",
                "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean")


@dataclass
class DPOSettings:
    beta: float
    loss_types: list[str]
    loss_weights: list[float] | None
    label_smoothing: float
    average_log_probs: bool
    sft_average_log_probs: bool
    gt_reward_scale: float
    preference_loss_weight: float
    sft_loss_weight: float
    loss_kwargs: dict
    chunk_size: int

    @classmethod
    def from_config(cls, cfg: DPOConfig) -> "DPOSettings":
        names = [cfg.preference_loss] if isinstance(cfg.preference_loss, str) else list(cfg.preference_loss)
        for name in names:
            if name not in LOSS_TYPES:
                raise ValueError(f"model.dpo.preference_loss={name!r}; expected one of {sorted(LOSS_TYPES)}")
        avg = cfg.preference_average_log_probs
        return cls(beta=cfg.ref_policy_kl_penalty, loss_types=names, loss_weights=cfg.preference_loss_weights,
                   label_smoothing=cfg.label_smoothing, average_log_probs=avg,
                   sft_average_log_probs=avg if cfg.sft_average_log_probs is None else cfg.sft_average_log_probs,
                   gt_reward_scale=cfg.gt_reward_scale, preference_loss_weight=cfg.preference_loss_weight,
                   sft_loss_weight=cfg.sft_loss_weight, loss_kwargs=dict(cfg.loss_kwargs),
                   chunk_size=cfg.logprob_chunk_size)

    @property
    def needs_reference(self) -> bool:
        return self.preference_loss_weight != 0 and not set(self.loss_types) <= REFERENCE_FREE_LOSSES


def pair_logprobs(model, batch: PreferenceBatch, chunk_size: int):
    """(chosen sums, rejected sums, chosen token counts, rejected token counts), each [P].

    model: a GPTModel, or a TokenLogProbModel (the head inside its forward, as FSDP and pipelines need)."""
    from nemo_aligner.models.logprob_model import TokenLogProbModel

    if isinstance(model, TokenLogProbModel):
        return pairs_from_token_logprobs(batch, model(batch.input_ids, labels=batch.labels,
                                                      segment_ids=batch.segment_ids))
    hidden = model(batch.input_ids, segment_ids=batch.segment_ids)
    sums, counts = sequence_logprobs(hidden, model.output_weight, batch.labels, batch.seq_index,
                                     2 * batch.num_pairs, chunk_size, model.config.final_logit_softcapping)
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def pairs_from_token_logprobs(batch: PreferenceBatch, token_logps_RT: torch.Tensor):
    """pair_logprobs' four [P] tensors from dense per-token log-probs [R, T] (a pipeline's last stage output)."""
    sums, counts = sequence_sums(token_logps_RT, batch.labels, batch.seq_index, 2 * batch.num_pairs)
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def reference_pair_sums(batch: PreferenceBatch, token_logps_RT: torch.Tensor):
    """[2, P] (chosen, rejected) summed log-probs: what a reference pass keeps of each micro-batch."""
    chosen, rejected, _, _ = pairs_from_token_logprobs(batch, token_logps_RT)
    return torch.stack([chosen, rejected])


class OnlineReference:
    """A frozen copy of the initial policy, run without gradients.

    copy_model=False adopts `model` as is (a copy the caller already sharded like the policy). A
    TokenLogProbModel reference is run by the step executor for the whole global batch before the
    policy step (`DPOAlgorithm.prepare_batches`), which is how it works under pipeline parallel."""

    def __init__(self, model, copy_model: bool = True):
        self.model = (copy.deepcopy(model) if copy_model else model).requires_grad_(False).eval()
        set_adapters_enabled(self.model, False)  # with LoRA the reference is the base model

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch, chunk_size: int):
        chosen, rejected, _, _ = pair_logprobs(self.model, batch, chunk_size)
        return chosen, rejected


class AdapterReference:
    """ref_mode=adapter: the policy itself with its LoRA adapters switched off, no second copy of the
    weights (the base is frozen, so this is the initial model at every step). `model` is the policy:
    whoever runs it directly as the reference (`prepare_batches`) does so inside adapters_disabled."""

    def __init__(self, policy):
        self.model = policy

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch, chunk_size: int):
        with adapters_disabled(self.model):
            chosen, rejected, _, _ = pair_logprobs(self.model, batch, chunk_size)
        return chosen, rejected


class DPOAlgorithm:
    """What the loop calls: make micro-batches, compute a micro-batch's loss, reduce metrics."""

    unit = "pairs"

    def __init__(self, model, settings: DPOSettings, pad_id: int, reference=None, autocast=None):
        self.model = model
        self.settings = settings
        self.pad_id = pad_id
        self.reference = reference  # OnlineReference, or None when log-probs are precomputed / not needed
        self.autocast = autocast or torch.autocast("cpu", enabled=False)

    @staticmethod
    def num_units(batch: PreferenceBatch) -> int:
        return batch.num_pairs

    def make_batch(self, dataset, items, packed: bool) -> PreferenceBatch:
        if packed:
            return collate_packed(dataset, items, self.pad_id)
        return collate_padded(dataset, items, self.pad_id)

    def loss(self, batch: PreferenceBatch, num_pairs_global: int):
        with self.autocast:
            policy = pair_logprobs(self.model, batch, self.settings.chunk_size)
            reference = self._reference_logprobs(batch)
        return self.loss_from_logprobs(batch, policy, reference, num_pairs_global)

    def loss_from_token_logprobs(self, batch: PreferenceBatch, token_logps_RT, num_pairs_global: int):
        """The loss from a pipeline's last-stage output (dense per-token log-probs [R, T])."""
        return self.loss_from_logprobs(batch, pairs_from_token_logprobs(batch, token_logps_RT),
                                       self._reference_logprobs(batch), num_pairs_global)

    def prepare_batches(self, batches, executor) -> None:
        """Reference log-probs for a whole global batch in one executor pass (online mode with a
        TokenLogProbModel reference); precomputed or reference-free runs need nothing."""
        from nemo_aligner.models.logprob_model import TokenLogProbModel

        if (not self.settings.needs_reference or self.reference is None
                or not isinstance(self.reference.model, TokenLogProbModel)
                or all(b.ref_chosen is not None for b in batches)):
            return
        with adapters_disabled(self.reference.model):  # ref_mode=adapter: the policy's base; else a no-op
            refs = executor.forward_only(self.reference.model, batches, reference_pair_sums)
        for batch, ref in zip(batches, refs):
            batch.ref_chosen, batch.ref_rejected = ref[0], ref[1]

    def loss_from_logprobs(self, batch: PreferenceBatch, policy, reference, num_pairs_global: int):
        """(loss, metric sums) from policy (chosen, rejected, chosen counts, rejected counts) and reference
        (chosen, rejected) log-probs, each [P]; the reference pair is (None, None) when not needed."""
        s = self.settings
        pc, pr, len_c, len_r = policy
        rc, rr = reference
        kwargs = dict(beta=s.beta, label_smoothing=s.label_smoothing, chosen_rewards=batch.chosen_rewards,
                      rejected_rewards=batch.rejected_rewards, gt_reward_scale=s.gt_reward_scale,
                      chosen_lengths=len_c, rejected_lengths=len_r, average_log_probs=s.average_log_probs,
                      **s.loss_kwargs)
        pref = torch.zeros_like(pc)
        if s.preference_loss_weight != 0:
            pref = combined_preference_loss(s.loss_types, s.loss_weights, pc, pr, rc, rr, **kwargs)
        sft = sft_loss_from_logps(pc, len_c, average_log_probs=s.sft_average_log_probs)
        per_pair = s.preference_loss_weight * pref + s.sft_loss_weight * sft
        loss = per_pair.sum() / num_pairs_global
        return loss, self._metric_sums(per_pair, pref, sft, pc, pr, rc, rr, len_c, len_r)

    def _reference_logprobs(self, batch):
        if not self.settings.needs_reference:
            return None, None
        if batch.ref_chosen is not None:
            return batch.ref_chosen, batch.ref_rejected
        if self.reference is None:
            raise RuntimeError("reference log-probs are neither precomputed nor computable (no reference model)")
        return self.reference(batch, self.settings.chunk_size)

    @torch.no_grad()
    def _metric_sums(self, per_pair, pref, sft, pc, pr, rc, rr, len_c, len_r):
        s = self.settings
        if s.average_log_probs:
            pc, pr = pc / len_c.clamp(min=1), pr / len_r.clamp(min=1)
            if rc is not None:
                rc, rr = rc / len_c.clamp(min=1), rr / len_r.clamp(min=1)
        dc = pc - (rc if rc is not None else 0.0)
        dr = pr - (rr if rr is not None else 0.0)
        all_rewards = torch.cat([dc, dr])
        return {
            "loss": per_pair.sum(), "preference_loss": pref.sum(), "sft_loss": sft.sum(),
            "acc": (dc > dr).float().sum(),
            "rewards_chosen_mean": dc.sum(), "rewards_rejected_mean": dr.sum(),
            "rewards_margin_mean": (s.beta * (dc - dr)).sum(),
            "logps_chosen_mean": pc.sum(), "logps_rejected_mean": pr.sum(),
            "rewards_all_sum": all_rewards.sum(), "rewards_all_sumsq": all_rewards.square().sum(),
        }

    @staticmethod
    def reduce_metrics(sums: dict, num_pairs: int) -> dict[str, float]:
        """Per-pair means from summed metrics (after summing across micro-batches and ranks)."""
        out = {name: float(sums[name]) / num_pairs for name in MEAN_METRICS}
        n = 2 * num_pairs
        mean = float(sums["rewards_all_sum"]) / n
        var = max(float(sums["rewards_all_sumsq"]) / n - mean * mean, 0.0)
        out["rewards_all_mean"], out["rewards_all_std"] = mean, var ** 0.5
        return out


@torch.no_grad()
def precompute_reference(model, dataset, micro_batch_items, pad_id: int, chunk_size: int, autocast, packed=False):
    """Fill dataset.ref_chosen / ref_rejected with the current model's log-probs (one pass, no grad);
    LoRA adapters are off for it, so with LoRA these are the base model's."""
    was_training = model.training
    model.eval()
    chosen = np.zeros(len(dataset), dtype=np.float64)
    rejected = np.zeros(len(dataset), dtype=np.float64)
    for items in micro_batch_items:
        batch = (collate_packed if packed else collate_padded)(dataset, items, pad_id)
        device = next(model.parameters()).device
        batch = batch.to(device)
        with autocast, adapters_disabled(model):
            pc, pr, _, _ = pair_logprobs(model, batch, chunk_size)
        idx = batch.pair_indices.cpu().numpy()
        chosen[idx], rejected[idx] = pc.double().cpu().numpy(), pr.double().cpu().numpy()
    model.train(was_training)
    dataset.ref_chosen, dataset.ref_rejected = chosen, rejected
