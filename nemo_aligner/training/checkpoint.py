"""Resumable checkpoints: model + optimiser through torch.distributed.checkpoint, the rest as JSON.

Layout: <log_dir>/checkpoints/step_00000012/ holding DCP shards, `trainer_state.json` (step,
consumed samples, monitored metric, RNG seed state) and nothing else. A checkpoint is written into
`step_N.tmp` and renamed when complete, so a kill mid-save never leaves a half checkpoint that
looks valid; incomplete folders are ignored (and removed on the next save). Works for plain
modules and for DTensor/FSDP2-sharded ones (each rank writes its own shards).
"""

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when torch.distributed is not initialised: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_options(model) -> StateDictOptions:
    """Frozen parameters (a LoRA run's base model) are neither saved nor loaded: every start reads them
    from the pretrained checkpoint, so a checkpoint holds the trainable ones (adapters) and their optimiser
    state. dcp.load still fails on any trainable tensor missing from the checkpoint."""
    frozen = any(not p.requires_grad for p in model.parameters())
    # Flattened optimiser state keys its param groups by parameter name: pipeline stages hold different
    # parameters, and a nested `param_groups` list would be saved once (rank 0's) for every rank.
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen, flatten_optimizer_state_dict=True)


class Checkpointer:
    def __init__(self, directory, save_top_k: int = 3, monitor: str = "val_loss", mode: str = "min",
                 topology: dict | None = None):
        """topology: the parallel layout (pp/dp/tp sizes, layer split), stored with each checkpoint; a
        resume under a different layout fails (sharded state only loads into the layout that wrote it)."""
        self.dir = Path(directory)
        self.save_top_k = save_top_k
        self.monitor = monitor
        self.mode = mode
        self.topology = topology

    def complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                 and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def step_of(path: Path) -> int:
        """The optimiser step a complete checkpoint was taken after."""
        return int(json.loads((path / STATE_FILE).read_text())["step"])

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if _is_rank_zero():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options(model))
        state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state()}
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp))
        if _is_rank_zero():
            extra = {"topology": self.topology} if self.topology is not None else {}
            (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, **extra, "step": step}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, model, optimizer) -> dict:
        saved = json.loads((path / STATE_FILE).read_text())
        layout = saved.get("topology") or {"pp": 1, "dp": 1, "tp": 1}
        mine = self.topology or {"pp": 1, "dp": 1, "tp": 1}
        if {k: layout.get(k, 1) for k in mine} != mine:
            raise ValueError(f"{path} was saved with parallel layout {layout} but this run uses {mine}; resume "
                             "with the same trainer.num_nodes x devices, tensor/pipeline_model_parallel_size and "
                             "pipeline_layer_split (or start a new log dir from the exported Hugging Face model)")
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options(model))
        state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state()}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_state_options(model))
        torch.set_rng_state(state["rng"])
        return json.loads((path / STATE_FILE).read_text())

    def _prune(self):
        """Keep the latest checkpoint (for resume) and the `save_top_k` best by the monitored metric."""
        done = self.complete()
        if self.save_top_k < 0 or len(done) <= 1:
            return
        keep = {done[-1]}
        scored = []
        for path in done:
            value = json.loads((path / STATE_FILE).read_text()).get("monitor_value")
            if value is not None:
                scored.append((value, path))
        scored.sort(key=lambda vp: vp[0], reverse=self.mode == "max")
        keep.update(path for _, path in scored[: self.save_top_k])
        if not scored:  # nothing monitored yet: keep the most recent k
            keep.update(done[-max(self.save_top_k, 1):])
        for path in done:
            if path not in keep:
                shutil.rmtree(path)
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
