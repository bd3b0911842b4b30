"""The log dir belongs to one run: a lock keeps a second live run out, an old run is moved aside (never
deleted or overwritten), a checkpoint records what made it and a resume from someone else's checkpoint
is refused, and a finished run is recognised.

- Lock: `<log_dir>/.nemo_aligner.lock`, held with flock(2) by rank 0 for the life of the process (the
  kernel releases it when the process ends, however it ends) and naming its holder (host, pid, start).
- Old outputs: a run that starts at step 0 in a folder holding another run's outputs (metrics.jsonl,
  checkpoints/, hf/, ...) moves them into `<log_dir>/previous_runs/<time>/` first. The reference
  log-prob cache (ref_logps/, keyed by model and data) stays: it is never overwritten.
- Identity: what defines a run (model, training data, architecture, tokenisation, loss) is stored with
  every checkpoint; `identity_differences` lists what differs, for the refusal. Everything else in the
  config (optimiser, schedule, clipping, max_steps, ...) may change on resume: `config_changes` lists the
  changes, to be logged.
- Finished: `<log_dir>/finished.json` ({"step": N}) is written after the final export; a rerun whose
  latest checkpoint is that step has nothing to do.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from nemo_aligner.training.checkpoint import Checkpointer, _barrier, read_state

log = logging.getLogger("nemo_aligner")

LOCK_FILE = ".nemo_aligner.lock"
FINISHED_FILE = "finished.json"
PREVIOUS_RUNS = "previous_runs"
# what a run writes into its log dir (moved aside together); ref_logps/ is a keyed cache and stays
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "hf", "hf_base", "curves.png", "wandb", FINISHED_FILE)
_HELD: dict[str, int] = {}  # lock file -> descriptor, for the locks this process holds


# ------------------------------------------------------------------------------------------------ lock
def acquire_lock(log_dir: Path) -> None:
    """Hold the log dir's lock for this process, or raise ValueError naming the live run that holds it.
    A second call from the same process (a rerun in one Python session) keeps the lock it has."""
    path = Path(log_dir) / LOCK_FILE
    key = str(path.resolve())
    if key in _HELD:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ValueError(f"{log_dir} is in use by another live run ({holder}); wait for it to end, or give this run "
                         "its own exp_manager.explicit_log_dir") from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("%s: this file system does not support locks, so nothing keeps a second run out of %s",
                    path, log_dir)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                             "command": " ".join(sys.argv)}).encode())
    _HELD[key] = fd


def release_lock(log_dir: Path) -> None:
    fd = _HELD.pop(str((Path(log_dir) / LOCK_FILE).resolve()), None)
    if fd is not None:
        os.close(fd)  # the file stays: deleting a lock file races with a run that is opening it


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
    except (OSError, ValueError):
        return "holder unknown"


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- old run outputs
def run_outputs(log_dir: Path) -> list[Path]:
    """The outputs of a run that are in `log_dir` (empty folders do not count)."""
    out = []
    for name in RUN_OUTPUTS:
        path = Path(log_dir) / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            out.append(path)
    return out


def move_aside(log_dir: Path) -> Path | None:
    """Move an earlier run's outputs into <log_dir>/previous_runs/<time>/; returns that folder (None: nothing)."""
    outputs = run_outputs(log_dir)
    if not outputs:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = Path(log_dir) / PREVIOUS_RUNS / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = Path(log_dir) / PREVIOUS_RUNS / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for path in outputs:
        shutil.move(str(path), str(target / path.name))
    return target


# ------------------------------------------------------------------------------------------- finished
def finished_step(log_dir: Path) -> int | None:
    """The step whose export completed the run in `log_dir`, or None."""
    path = Path(log_dir) / FINISHED_FILE
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_finished(log_dir: Path, step: int, hf_dir) -> None:
    path = Path(log_dir) / FINISHED_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "hf": str(hf_dir), "time": _now()}, indent=2))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- identity
def flatten(value, prefix: str = "") -> dict:
    """{"a.b": leaf} for nested dicts; lists and other leaves stay whole."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


SOURCES = "sources"  # the identity's where-from part (paths, file names): shown in messages, never compared


def identity_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> now' for every identity entry that differs (both flattened; `sources` left out, so a model
    or data set that moved to another path is still the same)."""
    old, new = (flatten({k: v for k, v in d.items() if k != SOURCES}) for d in (saved, current))
    return [f"{key}: {_show(old.get(key))} -> now {_show(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every config key whose value changed since the checkpoint was written."""
    old, new = flatten(saved), flatten(current)
    return [f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}"
            for key in sorted(set(old) & set(new)) if old[key] != new[key]]


def refusal(checkpoint: Path, differences: list[str], log_dir: Path, saved: dict, current: dict) -> str:
    shown = "\n  ".join(differences[:10]) + (f"\n  ... and {len(differences) - 10} more" if len(differences) > 10
                                             else "")
    sources = "".join(f"\n  {key}: {_show(value)} -> now {_show(flatten(current.get(SOURCES, {})).get(key))}"
                      for key, value in flatten(saved.get(SOURCES, {})).items())
    return (f"{checkpoint} was written by a different run; resuming it would mix two runs. What differs:\n  {shown}\n"
            f"It was made from:{sources or ' (not recorded)'}\n"
            f"Either give this run its own folder (exp_manager.explicit_log_dir=<new folder>), or set "
            f"exp_manager.resume_if_exists=false to move the old run aside (into {Path(log_dir) / PREVIOUS_RUNS}/) "
            "and start afresh here. To continue the old run, use its settings.")


# --------------------------------------------------------------------------------------- the decision
@dataclass
class Resume:
    """Where a run starts: a checkpoint to continue from (None: step 0), and whether that checkpoint is the end
    of this very run, finished and exported (then there is nothing to do)."""

    checkpoint: Path | None = None
    step: int = 0
    finished: bool = False


def decide_resume(log_dir: Path, *, resume: bool, ignore_no_checkpoint: bool, identity: dict, config: dict,
                  max_steps: int, is_rank_zero: bool) -> Resume:
    """Resume from the newest complete, finite checkpoint when `resume` (exp_manager.resume_if_exists with
    checkpoints on) finds one, after checking it was made by this run (ValueError naming what differs) and
    logging every setting that changed; otherwise start at step 0, moving an earlier run's outputs aside."""
    latest = Checkpointer(Path(log_dir) / "checkpoints").latest() if resume else None
    if latest is None:
        if resume and not ignore_no_checkpoint:
            raise ValueError(f"exp_manager.resume_if_exists=true and resume_ignore_no_checkpoint=false, but "
                             f"{Path(log_dir) / 'checkpoints'} holds no complete checkpoint")
        _barrier()  # every rank has looked before anything moves
        moved = move_aside(log_dir) if is_rank_zero else None
        if moved is not None:
            log.info("%s held an earlier run's outputs; moved them to %s (nothing is deleted) and starting at step 0",
                     log_dir, moved)
        _barrier()
        return Resume()
    saved = read_state(latest)
    check_identity(latest, saved.get("identity"), identity, log_dir)
    for change in config_changes(saved.get("config") or {}, config):
        log.info("resuming with a changed setting: %s", change)
    step = int(saved["step"])
    if step >= max_steps and finished_step(log_dir) != step:
        log.info("%s is at step %d >= max_steps=%d: nothing to train, finishing the run", latest, step, max_steps)
    return Resume(latest, step, finished=step >= max_steps and finished_step(log_dir) == step)


def check_identity(checkpoint: Path, saved: dict | None, current: dict, log_dir: Path) -> None:
    if saved is None:
        log.warning("warning: %s records no run identity (an older version wrote it): it cannot be checked against "
                    "this run", checkpoint)
        return
    differences = identity_differences(saved, current)
    if differences:
        raise ValueError(refusal(checkpoint, differences, log_dir, saved, current))
