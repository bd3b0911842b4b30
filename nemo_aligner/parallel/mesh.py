"""Who launched us and how the processes are laid out: one object owns the parallel sizes, the named
mesh axes and every start-up check on them.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm `srun`
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous host is the first host of
SLURM_JOB_NODELIST, the port MASTER_PORT or 29500). No launcher variables = one process, no process
group, nothing distributed.

Layout: world = pp x dp x tp with mesh dims ("pp", "dp", "tp"), tp innermost so a tensor-parallel
group is the GPUs of one node (NVLink) whenever tp <= devices per node; data parallel is FSDP2 over
"dp"; pipeline stages are "pp". Config keys keep Megatron's names.
"""

import logging
import os
import re
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MESH_DIMS = ("pp", "dp", "tp")
DEFAULT_PORT = 29500
PIPELINE_SCHEDULES = ("1f1b", "gpipe")


# ---------------------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class LaunchEnv:
    """This process's rank and the rendezvous, as the launcher described them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, env=None) -> "LaunchEnv":
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also torchrun inside an sbatch script)
            return cls(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                       local_rank=_int(env, "LOCAL_RANK", 0), master_addr=env.get("MASTER_ADDR"),
                       master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), launcher="torchrun")
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if "SLURM_PROCID" in env and ntasks_key in env:  # srun, one task per GPU
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = env.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else None)
            world = _int(env, ntasks_key)
            if world > 1 and addr is None:
                raise ValueError("Slurm launch without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the "
                                 "rendezvous host; export MASTER_ADDR")
            return cls(rank=_int(env, "SLURM_PROCID"), world_size=world, local_rank=_int(env, "SLURM_LOCALID", 0),
                       master_addr=addr, master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), launcher="slurm")
        return cls()

    def export(self, env=None) -> None:
        """Write the torch `env://` variables so init_process_group finds the rendezvous (Slurm sets none)."""
        env = os.environ if env is None else env
        env.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                   MASTER_ADDR=str(self.master_addr or "127.0.0.1"), MASTER_PORT=str(self.master_port or DEFAULT_PORT))


def _int(env, key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: `node[01-04,07]`, `a1,b[2-3]`, `r[1-2]-n[1-2]`."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = []
        for piece in pieces:
            if piece.startswith("["):
                if not piece.endswith("]"):
                    raise ValueError(f"malformed Slurm node list {nodelist!r}")
                choices.append(_expand_range(piece[1:-1], nodelist))
            elif piece:
                choices.append([piece])
        hosts.extend("".join(combo) for combo in product(*choices))
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char == "["
        depth -= char == "]"
        if depth < 0:
            raise ValueError(f"malformed Slurm node list {text!r}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"malformed Slurm node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"malformed range [{spec}] in Slurm node list {nodelist!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"decreasing range {item} in Slurm node list {nodelist!r}")
        width = len(lo)  # zero padding as written: [01-10] -> 01 .. 10
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


# ---------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three parallel dimensions, validated against the launch and the config."""

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    pipeline_schedule: str = "1f1b"
    layer_split: tuple | None = None  # layers per pipeline stage; None = even split

    @classmethod
    def from_config(cls, trainer_cfg, model_cfg, world_size: int) -> "ParallelDims":
        """Check the launch against trainer.num_nodes x trainer.devices and split world into pp x dp x tp."""
        expected = trainer_cfg.num_nodes * trainer_cfg.devices
        if world_size != expected:
            raise ValueError(f"launched {world_size} process(es) but trainer.num_nodes x trainer.devices = "
                             f"{trainer_cfg.num_nodes} x {trainer_cfg.devices} = {expected}; they must match")
        tp, pp = model_cfg.tensor_model_parallel_size, model_cfg.pipeline_model_parallel_size
        for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
            if value < 1:
                raise ValueError(f"model.{key}={value}; expected a positive integer")
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by model.tensor_model_parallel_size ({tp}) x "
                             f"model.pipeline_model_parallel_size ({pp}) = {tp * pp}")
        split = getattr(model_cfg, "pipeline_layer_split", None)
        schedule = getattr(model_cfg, "pipeline_schedule", "1f1b")
        if schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"model.pipeline_schedule={schedule!r}; expected one of {list(PIPELINE_SCHEDULES)}")
        dims = cls(world_size=world_size, tp=tp, pp=pp, dp=world_size // (tp * pp),
                   sequence_parallel=bool(getattr(model_cfg, "sequence_parallel", False)),
                   pipeline_schedule=schedule, layer_split=tuple(split) if split is not None else None)
        dims.check_batch(model_cfg.global_batch_size, model_cfg.micro_batch_size)
        if dims.sequence_parallel and pp > 1:
            raise ValueError("model.sequence_parallel=true with model.pipeline_model_parallel_size > 1 is not supported "
                             "(stage boundaries carry full sequences); set model.sequence_parallel=false")
        return dims

    def check_batch(self, global_batch_size: int, micro_batch_size: int) -> None:
        if global_batch_size % (micro_batch_size * self.dp):
            raise ValueError(f"model.global_batch_size={global_batch_size} is not divisible by "
                             f"model.micro_batch_size ({micro_batch_size}) x data-parallel size ({self.dp}) = "
                             f"{micro_batch_size * self.dp}")
        num_micro = global_batch_size // (micro_batch_size * self.dp)
        if self.pp > 1 and self.pipeline_schedule == "1f1b" and num_micro < self.pp:
            raise ValueError(f"1F1B needs at least as many micro-batches per step as pipeline stages: "
                             f"model.global_batch_size / (micro_batch_size x dp) = {global_batch_size} / "
                             f"({micro_batch_size} x {self.dp}) = {num_micro} < pipeline_model_parallel_size={self.pp}; "
                             "raise global_batch_size, lower micro_batch_size, or use model.pipeline_schedule=gpipe")

    def check_model(self, config) -> None:
        """Architecture constraints of tp and pp (config: a GPTConfig, known once the checkpoint is read)."""
        tp, pp = self.tp, self.pp
        for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(config, key)
            if value % tp:
                raise ValueError(f"model.{key}={value} is not divisible by model.tensor_model_parallel_size={tp}")
        if config.num_layers < pp:
            raise ValueError(f"model.num_layers={config.num_layers} < model.pipeline_model_parallel_size={pp}: "
                             "every pipeline stage needs at least one layer")
        if pp > 1 and config.share_embeddings_and_output_weights:
            raise ValueError("tied input/output embeddings (share_embeddings_and_output_weights / "
                             "tie_word_embeddings) are not supported with model.pipeline_model_parallel_size > 1: "
                             "the first and last stage would both need the weight; use pipeline_model_parallel_size=1 "
                             "(tensor and data parallel handle tied embeddings)")
        self.stage_layers(config.num_layers)

    def stage_layers(self, num_layers: int) -> list[range]:
        """Global layer indices of each pipeline stage (model.pipeline_layer_split, else an even split)."""
        if self.layer_split is None:
            base, extra = divmod(num_layers, self.pp)
            counts = [base + (1 if s < extra else 0) for s in range(self.pp)]
        else:
            counts = [int(c) for c in self.layer_split]
            if len(counts) != self.pp or sum(counts) != num_layers or min(counts) < 1:
                raise ValueError(f"model.pipeline_layer_split={list(self.layer_split)}: expected "
                                 f"{self.pp} positive counts (one per pipeline stage) summing to "
                                 f"model.num_layers={num_layers}")
        if min(counts) < 1:
            raise ValueError(f"model.num_layers={num_layers} cannot be split over {self.pp} pipeline stages")
        starts = [sum(counts[:s]) for s in range(self.pp)]
        return [range(start, start + count) for start, count in zip(starts, counts)]

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp, self.tp)

    def describe(self) -> str:
        return f"world {self.world_size} = pp {self.pp} x dp {self.dp} x tp {self.tp}"


# ---------------------------------------------------------------------------------------- runtime
@dataclass
class Parallel:
    """The live layout: sizes, this rank's coordinates and the device mesh (None in a single process)."""

    dims: ParallelDims = field(default_factory=ParallelDims)
    mesh: object = None  # DeviceMesh with dims ("pp", "dp", "tp")
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def coordinate(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim) if self.distributed else 0

    @property
    def pp_rank(self) -> int:
        return self.coordinate("pp")

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def tp_rank(self) -> int:
        return self.coordinate("tp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def group(self, dim: str):
        return self.mesh.get_group(dim) if self.distributed else None

    def stage_leader(self, stage: int) -> int:
        """Global rank of (pp=stage, dp=0, tp=0): the rank that speaks for a stage."""
        return stage * self.dims.dp * self.dims.tp

    def pp_peer(self, stage: int) -> int:
        """Global rank of the process at pipeline stage `stage` with this process's dp and tp coordinates."""
        return self.rank + (stage - self.pp_rank) * self.dims.dp * self.dims.tp


def init_parallel(trainer_cfg, model_cfg, env: LaunchEnv | None = None) -> Parallel:
    """Validate the layout, then (when launched with more than one process) join the process group and
    build the ("pp", "dp", "tp") mesh. Sets the CUDA device from the local rank before anything else."""
    env = env or LaunchEnv.from_environ()
    dims = ParallelDims.from_config(trainer_cfg, model_cfg, env.world_size)
    use_cuda = trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto"
                                                              and torch.cuda.is_available())
    if use_cuda and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda and torch.cuda.is_available() \
        else torch.device("cpu")
    if not env.distributed:
        return Parallel(dims=dims, device=device)
    if not dist.is_initialized():
        if env.launcher == "slurm":
            env.export()
        # NCCL for GPU tensors plus gloo for the few CPU tensors (metric sums, counts) the loop reduces
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != env.world_size:
        raise ValueError(f"process group has {dist.get_world_size()} ranks but the launcher says {env.world_size}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, dims.mesh_shape, mesh_dim_names=MESH_DIMS)
    return Parallel(dims=dims, mesh=mesh, rank=dist.get_rank(), device=device)
