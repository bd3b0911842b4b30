"""The training loop shared by every algorithm: data order, accumulation, clipping, optimiser and
schedule steps, validation and checkpoint cadence, logging and resume.

The algorithm (`training.protocol.Algorithm`) collates micro-batches, counts the units its loss is
normalised by and computes losses from the model's outputs; the run (`parallel.run.ParallelRun`)
supplies the executor that runs the model, the data-parallel group and the gradients' completion and
clipping. The loop
samples *items* (`data.layout`: examples, or packs of them; prompts for an online algorithm, whose
`rollout` makes each step's batch of completions, see `online_step`). The data order is a function of
(seed, epoch) only, so a resumed run continues the exact trajectory of an uninterrupted one.

After every step the loop asks `training.signals.StopWatch` whether to stop (SIGTERM / SIGUSR1 /
trainer.max_time: save and return); `training.guards` stops it before an update whose loss or gradient
norm is not finite and before a checkpoint of non-finite weights, and warns about dead gradients.
"""

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from nemo_aligner.parallel.data_parallel import split_for_rank, strided_share
from nemo_aligner.training.guards import DeadGradientWatch, NonFiniteError, check_finite, weights_finite
from nemo_aligner.training.optim import optimizer_state_on
from nemo_aligner.training.protocol import is_online
from nemo_aligner.training.signals import StopWatch

log = logging.getLogger(__name__)
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")  # optimiser settings that may change on resume


class GlobalBatchSampler:
    """Items of each global batch: a seeded permutation per epoch, incomplete last batch dropped."""

    def __init__(self, num_items: int, global_batch_size: int, seed: int, shuffle: bool = True,
                 limit_batches=1.0, name: str = "train"):
        self.num_items, self.global_batch_size, self.seed, self.shuffle = num_items, global_batch_size, seed, shuffle
        full = num_items // global_batch_size
        if full == 0:
            raise ValueError(f"{name} data has {num_items} items but model.global_batch_size={global_batch_size}; "
                             "the dataset must hold at least one global batch (lower global_batch_size or add data)")
        limit = limit_batches if isinstance(limit_batches, int) else max(1, int(full * limit_batches))
        self.steps_per_epoch = min(full, limit)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def global_batch(self, epoch: int, step_in_epoch: int) -> list[int]:
        start = step_in_epoch * self.global_batch_size
        return self.order(epoch)[start:start + self.global_batch_size].tolist()


@dataclass
class TrainingPlan:
    """How many steps a run takes and when it validates, known before anything is built around it."""

    sampler: GlobalBatchSampler
    max_steps: int
    val_every: int
    micro_batch_size: int

    @classmethod
    def from_config(cls, loop, *, num_items: int, global_batch_size: int, micro_batch_size: int, dp_size: int,
                    seed: int, shuffle: bool, items_per_step: int | None = None) -> "TrainingPlan":
        """loop: trainer.<algorithm> (max_epochs, max_steps, val_check_interval, limit_train_batches, ...).
        items_per_step: items drawn per step when they are not what global_batch_size counts (an online
        algorithm draws global_batch_size / group size prompts); None = global_batch_size."""
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"model.global_batch_size={global_batch_size} is not divisible by micro_batch_size "
                             f"({micro_batch_size}) x data-parallel size ({dp_size})")
        items_per_step = global_batch_size if items_per_step is None else items_per_step
        if items_per_step % dp_size:
            raise ValueError(f"{items_per_step} prompts per step (model.global_batch_size={global_batch_size} / group "
                             f"size) are not divisible by the data-parallel size ({dp_size}); groups are never split")
        sampler = GlobalBatchSampler(num_items, items_per_step, seed, shuffle, loop.limit_train_batches)
        steps_by_epochs = loop.max_epochs * sampler.steps_per_epoch
        max_steps = steps_by_epochs if loop.max_steps < 0 else min(loop.max_steps, steps_by_epochs)
        val_every = (loop.val_check_interval if isinstance(loop.val_check_interval, int)
                     else max(1, int(round(loop.val_check_interval * sampler.steps_per_epoch))))
        return cls(sampler, max_steps, val_every, micro_batch_size)


def validation_items(items: list, limit_val_batches, global_batch_size: int) -> list:
    """The validation items every check reads: the first `limit_val_batches` global batches (int) or that
    fraction of the items (float), in order."""
    n = len(items)
    count = (min(n, limit_val_batches * global_batch_size) if isinstance(limit_val_batches, int)
             else max(1, int(n * limit_val_batches)))
    return list(items[:count])


@dataclass
class LoopState:
    step: int = 0
    consumed_samples: int = 0
    best: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, *, model, algorithm, optimizer, scheduler, run, train_data, val_data, loop, plan: TrainingPlan,
                 logger, progress=None, checkpointer=None, monitor: str = "val_loss", data_metrics: dict | None = None,
                 stop: StopWatch | None = None, identity: dict | None = None, run_config: dict | None = None,
                 test_data=None, after_validation=None, after_save=None):
        """model: this rank's GPTModel (parameters, train/eval, checkpoints); run: a ParallelRun (executor,
        data-parallel group, gradient completion and clipping); loop: trainer.<algorithm> (clipping, save and validation
        limits); train_data / val_data / test_data: DataLayouts (test: evaluated whole at the last step); stop:
        signals and max_time (training.signals); identity / run_config: what made the run and its flattened
        config, stored with every checkpoint (training.run_dir); after_validation(step): called after every
        validation (exp_manager.val_samples: generated replies); after_save(step, checkpoint path): called on every
        rank after every checkpoint (exp_manager.checkpoint_callback_params.save_hf_every_checkpoint)."""
        self.model, self.algorithm, self.optimizer, self.scheduler = model, algorithm, optimizer, scheduler
        self.run, self.executor, self.dp = run, run.executor, run.dp
        self.executor.algorithm = algorithm
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.loop, self.plan, self.logger, self.progress, self.checkpointer = loop, plan, logger, progress, checkpointer
        self.sampler, self.max_steps, self.val_every = plan.sampler, plan.max_steps, plan.val_every
        self.micro_batch_size, self.monitor = plan.micro_batch_size, monitor
        self.data_metrics = data_metrics or {}
        self.after_validation, self.after_save = after_validation, after_save
        self.stop = stop or StopWatch()
        self.identity, self.run_config = identity, run_config
        # the optimiser's hyperparameters as configured: a resume loads the checkpoint's and puts these back,
        # so lr, betas, weight decay (and the schedule) may change between runs
        self.configured = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
        self.dead_gradient = DeadGradientWatch()
        self.state = LoopState()
        self.history: list[dict] = []
        self.last_saved: str | None = None

    # ------------------------------------------------------------------ steps
    def _num_units(self, batches) -> int:
        """What the loss is normalised by, summed over the global batch (pairs for DPO, tokens for SFT)."""
        local = torch.tensor([sum(self.algorithm.num_units(b) for b in batches)], dtype=torch.float64)
        return int(self.dp.all_reduce_sum(local).item())

    def train_step(self, items: list) -> dict:
        """One optimiser step; a non-finite loss or gradient norm raises NonFiniteError before the update.
        An online algorithm (training.protocol.Online) makes the step's batch first (online_step)."""
        if is_online(self.algorithm):
            return self.online_step(items)
        self.model.train()
        micro = split_for_rank(items, self.micro_batch_size, self.dp)
        batches = [self.algorithm.make_batch(self.train_data.dataset, m, self.train_data.packed) for m in micro]
        metrics = self._update(batches)
        self.scheduler.step()
        return metrics

    def _update(self, batches) -> dict:
        """Gradients of this rank's micro-batches, completed and clipped, checked, one optimiser step."""
        num_units = self._num_units(batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums = self.executor.forward_backward(batches, num_units)
        tokens = sum(batch.num_real_tokens for batch in batches)
        grad_norm = self._clip()
        metrics = self._reduce(sums, num_units)
        metrics["grad_norm"] = grad_norm
        check_finite(self.state.step + 1, metrics, ("loss", "grad_norm"), "train/", self._advice())
        self.optimizer.step()
        metrics["tokens"] = self.dp.all_reduce_sum(torch.tensor([float(tokens)])).item()
        return metrics

    def online_step(self, items: list) -> dict:
        """Online RL: the algorithm turns the step's prompt items into this rank's rollout (generation,
        rewards, advantages, reference log-probs), then num_iterations passes run over it, each one optimiser
        step per mini-batch (algorithm.num_mini_batches contiguous parts of every rank's rollout, default 1),
        the engine's weights synced after each. The schedule advances once per step (the updates share its
        lr); update metrics are averaged, the rollout's and the per-phase times added."""
        # offload_optimizer_state (PPO's model.ppo.offload_adam_states): the optimiser's state on the CPU while
        # the rollout generates and scores (a no-op when training runs on the CPU)
        with optimizer_state_on(self.optimizer, "cpu", getattr(self.algorithm, "offload_optimizer_state", False)):
            rollout = self.algorithm.rollout(self.train_data.dataset, items, self.state.step, self.run)
        self.model.train()
        local = list(range(len(rollout.dataset)))
        num_mini = getattr(self.algorithm, "num_mini_batches", 1)
        assert len(local) % num_mini == 0, "the algorithm checks that its rollout splits into its mini-batches"
        per_mini = len(local) // num_mini
        passes = []
        for _ in range(self.algorithm.num_iterations):
            for mini in (local[k * per_mini:(k + 1) * per_mini] for k in range(num_mini)):
                micro = [mini[i:i + self.micro_batch_size] for i in range(0, len(mini), self.micro_batch_size)]
                with rollout.times.phase("policy"):
                    # rebuilt per pass: the first pass records the rollout policy's log-probs for the next ones
                    batches = [self.algorithm.make_batch(rollout.dataset, m, self.train_data.packed) for m in micro]
                    passes.append(self._update(batches))
                    self.algorithm.sync_weights(self.model)
                rollout.times.add_tokens("policy", passes[-1]["tokens"])
        self.scheduler.step()
        metrics = {k: sum(p[k] for p in passes) / len(passes) for k in passes[0] if k != "tokens"}
        metrics["tokens"] = sum(p["tokens"] for p in passes)
        return metrics | rollout.metrics | rollout.times.metrics()

    def _advice(self) -> str:
        resume = (f"resumes from {self.last_saved}" if self.last_saved else
                  "starts afresh (there is no checkpoint yet)")
        return (f"Lower model.optim.lr (now {self.configured[0].get('lr', 0):g}) and keep gradient clipping on "
                f"(trainer.*.gradient_clip_val, now {self.loop.gradient_clip_val:g}); a rerun {resume} with the new "
                "settings.")

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.loop.gradient_clip_val if self.loop.gradient_clip_val > 0 else float("inf")
        return float(self.run.finish_grads(params, max_norm))

    def _reduce(self, sums: dict, num_units: int) -> dict:
        names = sorted(sums)
        stacked = self.dp.all_reduce_sum(torch.stack([sums[n].detach().double().cpu() for n in names]))
        return self.algorithm.reduce_metrics(dict(zip(names, stacked)), num_units)

    @torch.no_grad()
    def validate(self) -> dict:
        """val/* metrics over the first limit_val_batches global batches of the validation data ({}: none)."""
        limit = self.loop.limit_val_batches
        if self.val_data is None or limit == 0:
            return {}
        count = len(validation_items(self.val_data.items, limit, self.sampler.global_batch_size))
        metrics = (self.algorithm.validate(self.val_data, count, self.run) if is_online(self.algorithm)
                   else self.evaluate(self.val_data, count))
        check_finite(self.state.step, metrics, ("loss",), "val/", self._advice())
        return metrics

    @torch.no_grad()
    def evaluate(self, layout, count: int | None = None) -> dict:
        """Metrics of the first `count` items of a data layout (all of them: None), forward only."""
        self.model.eval()
        chosen = list(layout.items if count is None else layout.items[:count])
        batches = [self.algorithm.make_batch(layout.dataset, micro, layout.packed)
                   for micro in strided_share(chosen, self.micro_batch_size, self.dp)]
        num_units = self._num_units(batches)
        # Every data-parallel rank runs as many forwards as the busiest one (FSDP's all-gathers are
        # collective); the extra ones repeat real items and are not counted.
        num_real, num_forwards = len(batches), self.dp.all_reduce_max(len(batches))
        filler = batches[:1] or [self.algorithm.make_batch(layout.dataset, chosen[:1], layout.packed)]
        batches += filler * (num_forwards - num_real)
        sums = self.executor.evaluate(batches, num_units, num_real)
        return self._reduce(sums, num_units)

    # ------------------------------------------------------------------ the loop
    def resume(self, path) -> dict:
        """Continue from the checkpoint at `path` (model, optimiser state, step, consumed samples, RNG), with the
        configured optimiser hyperparameters and schedule (they may differ from the checkpoint's). Returns the
        checkpoint's trainer state."""
        saved = self.checkpointer.load(path, self.model, self.optimizer)
        self.state = LoopState(step=saved["step"], consumed_samples=saved["consumed_samples"],
                               best=saved.get("best", {}))
        for group, configured in zip(self.optimizer.param_groups, self.configured):
            group.update(configured)
            group["initial_lr"] = configured["lr"]
        # the schedule at the resumed step, from the configured base lr (the same float arithmetic as
        # LambdaLR.step, so an unchanged config continues bit for bit)
        self.scheduler.last_epoch = self.state.step
        for group, base, multiplier in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                           self.scheduler.lr_lambdas):
            group["lr"] = base * multiplier(self.state.step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.last_saved = str(path)
        log.info("resumed from %s at step %d", path, self.state.step)
        return saved

    def fit(self) -> dict:
        """Train to max_steps, or until a stop signal / trainer.max_time (result["stopped"] says why; a checkpoint
        is saved at the step it stops after)."""
        initial_val = self.validate() if self.state.step == 0 else {}
        if initial_val:
            log.info("validation before training: %s", _fmt(initial_val))
            self._validated()
        # a resumed run starts from a saved state: that state needs no second write if no step follows it
        last_val, last_train, stopped, self.last_test = {}, {}, None, {}
        saved_at = self.state.step if self.state.step > 0 else None
        start_time = time.perf_counter()
        while self.state.step < self.max_steps:
            t0 = time.perf_counter()
            last_train, val = self._train_and_log()
            last_val = val or last_val
            if self._should_save():
                self._save(last_val)
                saved_at = self.state.step
            self.stop.note_iteration(time.perf_counter() - t0)
            stopped = self.stop.should_stop()
            if stopped is not None:
                log.info("stopping after step %d of %d: %s", self.state.step, self.max_steps, stopped)
                break
        if self.checkpointer is not None and saved_at != self.state.step and self.state.step > 0:
            self._save(last_val)
        return {"initial_val": initial_val, "train": last_train, "val": last_val, "test": self.last_test,
                "steps": self.state.step, "time": time.perf_counter() - start_time, "stopped": stopped}

    def _train_and_log(self) -> tuple[dict, dict]:
        """One step, its validation when due (and the test split after the last step), its metrics record logged;
        returns (train metrics, val metrics)."""
        epoch, k = divmod(self.state.step, self.sampler.steps_per_epoch)
        t0 = time.perf_counter()
        items = [self.train_data.items[i] for i in self.sampler.global_batch(epoch, k)]
        train = self.train_step(items)
        step_time = time.perf_counter() - t0
        self.state.step += 1
        self.state.consumed_samples += self.sampler.global_batch_size
        tokens = train.pop("tokens")
        train = {**train, "lr": self.scheduler.get_last_lr()[0], "step_time": step_time, "epoch": epoch,
                 "consumed_samples": self.state.consumed_samples, "tokens_per_sec": tokens / step_time}
        self.dead_gradient.update(self.state.step, train["grad_norm"], train.get("loss", float("nan")))
        record = {f"train/{k}": v for k, v in train.items()} | self.data_metrics
        val = {}
        if self.state.step % self.val_every == 0 or self.state.step == self.max_steps:
            val = self.validate()
            record |= {f"val/{k}": v for k, v in val.items()}
            self._validated()
        if self.state.step == self.max_steps and self.test_data is not None:  # the test split, once, at the end
            self.last_test = (self.algorithm.validate(self.test_data, None, self.run) if is_online(self.algorithm)
                              else self.evaluate(self.test_data))
            check_finite(self.state.step, self.last_test, ("loss",), "test/", self._advice())
            record |= {f"test/{k}": v for k, v in self.last_test.items()}
        self.logger.log(self.state.step, record)
        self.history.append(record)
        if self.progress is not None:
            shown = {k: train[k] for k in self.algorithm.headline_metrics if k in train}
            self.progress.update(self.state.step, {**shown, "tok/s": train["tokens_per_sec"]})
        return train, val

    def _validated(self) -> None:
        if self.after_validation is not None and self.val_data is not None:
            self.after_validation(self.state.step)

    def _should_save(self) -> bool:
        every = self.loop.save_interval
        return self.checkpointer is not None and every > 0 and self.state.step % every == 0

    def _save(self, val: dict):
        if not weights_finite(self.model):
            raise NonFiniteError(f"step {self.state.step}: the weights hold NaN or inf values; no checkpoint is "
                                 f"written from them. {self._advice()}")
        metric = self.monitor.removeprefix("val_")
        value = val.get(metric)
        t0 = time.perf_counter()
        path = self.checkpointer.save(self.state.step, self.model, self.optimizer, {
            "consumed_samples": self.state.consumed_samples, "monitor": self.monitor,
            "monitor_value": None if value is None or math.isnan(value) else value, "best": self.state.best,
            "finite": True, "identity": self.identity, "config": self.run_config,
        })
        if self.after_save is not None:
            self.after_save(self.state.step, path)
        self.stop.note_save(time.perf_counter() - t0)
        self.last_saved = str(path)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
