"""Resumable checkpoints: model + optimiser through torch.distributed.checkpoint, the rest as JSON.

Layout: <log_dir>/checkpoints/step_00000012/ holding DCP shards and `trainer_state.json` (step,
consumed samples, monitored metric, the parallel layout, the run's identity and config, and the
manifest: every other file of the folder with its size). A checkpoint is written into `step_N.tmp`,
its manifest last, and renamed when complete; a folder counts as complete only when its state file
parses and every file of its manifest is there with its size, so a kill at any moment of a save never
leaves a checkpoint that looks valid (incomplete folders are ignored, and removed on the next save).
A step that already has a complete checkpoint is never written again (its state is the same), so no
save ever deletes a complete checkpoint before its replacement exists. Works for plain modules and for
DTensor/FSDP2-sharded ones (each rank writes its own shards).
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


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint folder ({} when missing or unreadable)."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def is_complete(path: Path) -> bool:
    """The state file parses and every file its manifest lists is there with its size. Checkpoints written
    before manifests existed count when their state file and DCP's .metadata are there."""
    state = read_state(path)
    if "step" not in state:
        return False
    files = state.get("files")
    if files is None:
        return (Path(path) / ".metadata").is_file()
    for name, size in files.items():
        file = Path(path) / name
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, default=str))


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
        """Complete checkpoints, oldest first (see the module docstring for what complete means)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_complete(p)]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose weights were finite (where a resume starts)."""
        done = [p for p in self.complete() if read_state(p).get("finite", True)]
        return done[-1] if done else None

    @staticmethod
    def step_of(path: Path) -> int:
        """The optimiser step a complete checkpoint was taken after."""
        return int(read_state(path)["step"])

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        final = self.dir / f"step_{step:08d}"
        if final.is_dir() and is_complete(final):  # same step, same state: never rewrite a complete checkpoint
            log.info("checkpoint %s exists and is complete; not written again", final)
            return final
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
        _barrier()  # every rank's shards are written before the manifest lists them
        if _is_rank_zero():
            extra = {"topology": self.topology} if self.topology is not None else {}
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            record = {**trainer_state, **extra, "step": step, "files": files}
            _write_json(tmp / STATE_FILE, record)  # last: a folder without it (or with a torn one) is incomplete
            if final.exists():  # an incomplete folder of the same step (a kill between two renames)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, model, optimizer) -> dict:
        saved = read_state(path)
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
        return saved

    @staticmethod
    def load_weights(path: Path, model) -> dict:
        """The model weights of a checkpoint only (no optimiser, no RNG), into a model of any layout (DCP reshards
        on load): for exporting a checkpoint. Returns its trainer state."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        options = _state_options(model)
        model_sd = get_model_state_dict(model, options=options)
        with _single_process_quiet():
            dcp.load({"model": model_sd}, checkpoint_id=str(path))
        set_model_state_dict(model, model_sd, options=options)
        return read_state(path)

    def _prune(self):
        """Keep the latest checkpoint, the newest finite one (for resume) and the `save_top_k` best by the
        monitored metric. Temporary folders of interrupted saves go."""
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        done = self.complete()
        if self.save_top_k < 0 or len(done) <= 1:
            return
        keep = {done[-1]}
        if (resume_point := self.latest()) is not None:
            keep.add(resume_point)
        scored = []
        for path in done:
            value = read_state(path).get("monitor_value")
            if value is not None:
                scored.append((value, path))
        scored.sort(key=lambda vp: vp[0], reverse=self.mode == "max")
        keep.update(path for _, path in scored[: self.save_top_k])
        if not scored:  # nothing monitored yet: keep the most recent k
            keep.update(done[-max(self.save_top_k, 1):])
        for path in done:
            if path not in keep:
                shutil.rmtree(path)
