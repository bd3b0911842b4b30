"""PPO's two trained models as one run: the actor (the policy's `ParallelRun`) and the critic (a
`models.score.ScoreModel`, the reward model's architecture, whose head read at every completion position
is the value of that state), each laid out by the same parallel plan, trained by one optimiser.

    critic_model = load_critic(path, parallel, seed=...)      # a *ForSequenceClassification or causal-LM folder
    run = ActorCriticRun(policy_run, critic_model)            # what the loop and the skeleton see
    run.model                 # ActorCritic(actor, critic): one optimiser (two models' parameters), checkpoints
    run.executor              # runs each micro-batch through the actor, then through the critic
    run.critic_values(batches, reduce_fn)                     # the critic's forward-only pass
    run.exports()             # {"hf": actor, "critic": critic}: what the end of the run writes

Why one optimiser over both (TRL wraps policy and value model in one module with one optimiser; NeMo-Aligner
ran a separate critic server with its own): one learning-rate schedule, one gradient clip over both (TRL's
max_grad_norm), and one checkpoint (`ActorCritic`'s state dict: `actor.*`, `critic.*`, and the optimiser's
state for both) that the shared loop saves and resumes without knowing there are two models.

The critic is initialised from the reward model's folder by default (NeMo-Aligner, TRL); a causal-LM
folder gets a fresh head (seeded). Shapes: R rows, T tokens.
"""

import logging
from pathlib import Path

from torch import nn

from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.models.hf import config_from_pretrained, load_pretrained
from nemo_aligner.models.hf.common import check_weight_files
from nemo_aligner.models.hf.peft import ADAPTER_CONFIG
from nemo_aligner.models.score import SEQUENCE_CLASSIFICATION, ScoreHead
from nemo_aligner.parallel.executor import accumulate
from nemo_aligner.parallel.run import ParallelRun, stage_pruner

log = logging.getLogger("nemo_aligner")
PROBE = "The quick brown fox: 12 + 30 = 42? Yes! <tag> \u00e9t\u00e9"  # any text; its ids must agree
PEFT_CRITIC = ("a PEFT adapter folder; the critic trains every weight, so give a full model folder (a reward model "
               "trained with model.peft.merge_on_export=true, or any *ForSequenceClassification / causal-LM folder)")


def check_scoring_folders(reward_path, critic_path, tokenizer) -> None:
    """Before any model is read: the reward model's folder (full, or PEFT SEQ_CLS adapters over their base) and
    the critic's (a full folder: it trains every weight) exist and open, and give the policy's token ids."""
    for path, key in ((Path(reward_path), "reward_model.restore_from_path"), (Path(critic_path), "critic.restore_from_path")):
        if not path.is_dir():
            raise ValueError(f"{key}={path}: not found; expected a *ForSequenceClassification (or causal-LM) folder")
        adapters = (path / ADAPTER_CONFIG).is_file()
        if adapters and key.startswith("critic"):
            raise ValueError(f"{key}={path}: {PEFT_CRITIC}")
        if not adapters:
            try:
                config_from_pretrained(path)
                check_weight_files(path)
            except (ValueError, OSError) as err:
                raise ValueError(f"{key}={path}: {err}") from None
        check_same_tokenizer(tokenizer, path, key)


def check_same_tokenizer(tokenizer, folder: Path, key: str) -> None:
    """The reward model and the critic read the policy's token ids: their folder's tokenizer (when it has one)
    must give the same ids."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return
    other = Tokenizer.from_path(folder)
    if other.vocab_size != tokenizer.vocab_size or other.encode(PROBE) != tokenizer.encode(PROBE):
        raise ValueError(f"{key}={folder}: its tokenizer differs from the policy's ({other.vocab_size} vs "
                         f"{tokenizer.vocab_size} tokens, or other ids); PPO scores the policy's token ids, so "
                         "the reward model and critic must share the policy's tokenizer")


def load_critic(path, parallel, *, seed: int, key: str = "critic.restore_from_path"):
    """This rank's ScoreModel (its pipeline stage) from a Hugging Face folder. A PEFT adapter folder is refused:
    the critic trains every weight."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{key}={path}: not found; expected a *ForSequenceClassification or causal-LM folder")
    if (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{key}={path}: {PEFT_CRITIC}")
    try:
        model = load_pretrained(path, dtype="fp32", device=parallel.device, prune=stage_pruner(parallel),
                                task=SEQUENCE_CLASSIFICATION, seed=seed)
    except (ValueError, OSError) as err:
        raise ValueError(f"{key}={path}: {err}") from None
    log.info("critic: %s parameters from %s", f"{model.num_parameters():,}", path)
    return model


class ActorCritic(nn.Module):
    """The two trained models under one module: one optimiser over its parameters, one checkpoint."""

    def __init__(self, actor, critic):
        super().__init__()
        self.actor, self.critic = actor, critic

    @property
    def config(self):
        return self.actor.config


class ActorCriticExecutor:
    """The loop's executor for PPO: each micro-batch through the actor (its algorithm's loss), then through
    the critic (`algorithm.critic_loss`); gradients land in both models, metric sums are merged."""

    def __init__(self, actor_executor, critic_executor):
        self.actor, self.critic = actor_executor, critic_executor

    @property
    def algorithm(self):
        return self.actor.algorithm

    @algorithm.setter
    def algorithm(self, algorithm):
        self.actor.algorithm = algorithm
        self.critic.algorithm = algorithm.critic_loss

    def forward_backward(self, batches, num_units: int) -> dict:
        sums = self.actor.forward_backward(batches, num_units)
        accumulate(sums, self.critic.forward_backward(batches, num_units))
        return sums

    def forward_only(self, module, batches, reduce_fn) -> list:
        return self.actor.forward_only(module, batches, reduce_fn)


class ActorCriticRun:
    """The policy's run plus the critic laid out like it; quacks like a ParallelRun for the loop and skeleton."""

    def __init__(self, policy_run: ParallelRun, critic_model, *, autocast=None, max_row_tokens: int = 0,
                 critic_source: str | None = None):
        self.policy_run = policy_run
        self.critic_run = ParallelRun(policy_run.parallel, critic_model, ScoreHead(), autocast=autocast,
                                      max_row_tokens=max_row_tokens)
        self.parallel, self.policy, self.dp = policy_run.parallel, policy_run.policy, policy_run.dp
        self.actor, self.critic = policy_run.model, critic_model
        self.critic_source = critic_source
        self.model = ActorCritic(self.actor, critic_model)
        self.executor = ActorCriticExecutor(policy_run.executor, self.critic_run.executor)

    def wrap_frozen(self, model, head):
        return self.policy_run.wrap_frozen(model, head)

    def finish_grads(self, params, max_norm: float) -> float:
        """Both models' gradients completed and clipped together (one global norm, as TRL clips its wrapper)."""
        return self.policy_run.finish_grads(params, max_norm)

    def topology(self) -> dict:
        return self.policy_run.topology()

    def critic_values(self, batches, reduce_fn) -> list:
        """reduce_fn(batch, scores_RT) per batch from the critic's forward-only pass (eval mode)."""
        module = self.critic_run.policy
        was_training = module.training
        module.eval()
        try:
            return self.critic_run.executor.forward_only(module, batches, reduce_fn)
        finally:
            module.train(was_training)

    def exports(self) -> dict:
        """name -> (this rank's model, the folder it started from): hf/ is the actor, critic/ the critic."""
        return {"critic": (self.critic, self.critic_source)}
