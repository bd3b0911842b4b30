"""The Hugging Face export of a run, whatever its layout: the model, or with LoRA a PEFT adapter folder
or a merged model (`export_hf`). One path for one process and many.

A sharded (FSDP / tensor / pipeline parallel) model is gathered to rank 0 a layer at a time and
streamed into safetensors shards (`export_model`); in one process that is plain `state_dict` reads.

For each layer (then the embeddings / final norm / output projection), the ranks of the stage that
owns it call `full_tensor()` on each parameter (the all-gathers run inside that stage), the stage's
first rank sends the full tensors to global rank 0, and rank 0 converts the layer with the family's
name map and appends it to the shard being written (flushed at `max_shard_size_bytes`). Rank 0 so
holds at most one layer plus one unwritten shard; no rank ever holds the whole model.
"""

import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from nemo_aligner.models.hf import hf_config_dict, infer_model_type, tensor_names
from nemo_aligner.models.hf.common import INDEX_FILE, SINGLE_FILE, atomic_dir, finish_atomic_dir, resolve_dtype
from nemo_aligner.models.hf.peft import adapter_specs, write_adapter_folder
from nemo_aligner.models.lora import base_weights, is_adapter_key, lora_modules
from nemo_aligner.models.score import saved_with_adapters

log = logging.getLogger("nemo_aligner")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class ShardedSafetensorsWriter:
    """Writes tensors as they arrive into shards of at most max_shard_bytes, then names them as
    `save_pretrained` does (one model.safetensors, or model-0000k-of-0000n + index)."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.current, self.current_bytes, self.total_bytes = {}, 0, 0
        self.shards: list[list[str]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.current and self.current_bytes + size > self.max_shard_bytes:
                self._flush()
            self.current[name] = tensor.contiguous()
            self.current_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.current, self.folder / f"part-{len(self.shards):05d}", metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / "part-00000", self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"part-{k:05d}", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _units(names: list[str]) -> list[list[str]]:
    """Parameter names grouped into export units: one per layer, then everything else."""
    layers, rest = {}, []
    for name in names:
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
        else:
            rest.append(name)
    return [layers[i] for i in sorted(layers)] + [rest]


def _owner(name: str, stage_layers: list[range]) -> int:
    match = _LAYER.match(name)
    if match:
        index = int(match.group(1))
        return next(s for s, layers in enumerate(stage_layers) if index in layers)
    if name.startswith(("embedding.", "position_embedding.")):
        return 0
    return len(stage_layers) - 1  # final_norm, output_layer


def export_model(parallel, stage_model, path, tokenizer=None, model_type: str | None = None, dtype=None,
                 max_shard_size_bytes: int = 5 * 2**30, source=None) -> Path:
    """Collective: every rank calls it with its stage's GPTModel (the pruned, sharded one; in one process,
    the model). Rank 0 writes `path` atomically (temporary folder renamed into place); all ranks return
    when it is complete. With LoRA this writes the base weights. dtype: of the written weights (default the
    parameters'); source: the checkpoint folder whose generation_config.json is carried over."""
    path = Path(path)
    config = stage_model.config
    model_type = model_type or getattr(stage_model, "hf_model_type", None) or infer_model_type(config)
    family = tensor_names(stage_model, model_type)  # a score model: <Family>ForSequenceClassification
    with torch.device("meta"):
        full_shapes = {name: t.shape for name, t in type(stage_model)(config).state_dict().items()}
    local = base_weights(stage_model.state_dict())  # LoRA-wrapped stages: base weights, original names
    param_dtype = next(iter(local.values())).dtype
    dtype = resolve_dtype(dtype) if dtype is not None else param_dtype
    stage_layers = parallel.dims.stage_layers(config.num_layers)
    is_zero = parallel.rank == 0
    writer = tmp = None
    if is_zero:
        tmp = atomic_dir(path)
        writer = ShardedSafetensorsWriter(tmp, max_shard_size_bytes)
    for unit in _units(list(full_shapes)):
        gathered = {}
        for name in unit:
            owner = _owner(name, stage_layers)
            leader = parallel.stage_leader(owner)
            tensor = None
            if parallel.pp_rank == owner:
                tensor = local[name]
                tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                if parallel.rank == leader and not is_zero:
                    dist.send(tensor.detach().contiguous().to(param_dtype), dst=0)
            if is_zero:
                if owner != 0:
                    tensor = torch.empty(full_shapes[name], dtype=param_dtype, device=parallel.device)
                    dist.recv(tensor, src=leader)
                gathered[name] = tensor.detach().to("cpu", dtype)
        if is_zero:
            writer.add(family.to_hf(gathered))
    if is_zero:
        writer.close()
        config_json = hf_config_dict(stage_model, model_type, dtype, tokenizer)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        carry_files(tmp, source, tokenizer)
        finish_atomic_dir(tmp, path)
    _barrier()
    return path


# files of a Hugging Face folder that the export carries over as they are: the generation defaults, and the
# tokenizer's files besides the two Tokenizer.save writes (tokenizer.json / tokenizer.model and its config)
GENERATION_FILES = ("generation_config.json",)
TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model")


def carry_files(folder: Path, source, tokenizer) -> None:
    """Copy generation_config.json from the checkpoint folder (`source`) and the tokenizer's other files from
    its folder into the export `folder`, never over a file the export wrote."""
    import shutil

    pairs = []
    if source is not None and Path(source).is_dir():
        pairs += [(Path(source), name) for name in GENERATION_FILES]
    tok_dir = Path(getattr(tokenizer, "name_or_path", "") or "")
    if tokenizer is not None and tok_dir.is_dir():
        pairs += [(tok_dir, name) for name in TOKENIZER_FILES]
    for src, name in pairs:
        if (src / name).is_file() and not (folder / name).exists():
            shutil.copyfile(src / name, folder / name)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def merge_adapters_(model) -> None:
    """Fold every adapter into its base weight in place (W += scale * B @ A) and zero B, so the model
    computes what it did, now from base weights alone (for exporting a sharded model as a merged one).
    DTensor weights (tensor parallel, FSDP) get their local slice of the update; collective then (A and B
    are gathered one module at a time), so every rank of the mesh must call it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for module in lora_modules(model).values():
        weight = module.base.weight
        delta = module.scale * (_full(module.lora_B.weight).float() @ _full(module.lora_A.weight).float())
        if isinstance(weight, DTensor):
            shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
            local = weight.to_local()
            local.add_(delta[tuple(slice(o, o + n) for o, n in zip(offset, shape))].to(local.dtype))
        else:
            weight.add_(delta.to(weight.dtype))
        module.lora_B.weight.zero_()


def gather_adapters(parallel, stage_model) -> tuple[dict, dict] | None:
    """Collective: (full adapter tensors, specs) of every pipeline stage, on global rank 0 (None elsewhere).
    Adapters are small, so each stage's first rank hands them over whole."""
    saved = saved_with_adapters(stage_model)  # a score model's head (PEFT's modules_to_save)
    tensors = {name: _full(t).detach().cpu() for name, t in stage_model.state_dict().items()
               if is_adapter_key(name) or name in saved}
    specs = adapter_specs(stage_model)
    if not dist.is_initialized():
        return tensors, specs
    leader = parallel.dp_rank == 0 and parallel.tp_rank == 0
    mine = (tensors, specs) if leader else ({}, {})
    gathered = [None] * dist.get_world_size() if parallel.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if parallel.rank != 0:
        return None
    all_tensors, all_specs = {}, {}
    for part_tensors, part_specs in gathered:
        all_tensors.update(part_tensors)
        all_specs.update(part_specs)
    return all_tensors, all_specs


def export_hf(parallel, model, path, tokenizer, peft_cfg, base_model_name_or_path: str | None, dtype=None,
              final: bool = True) -> Path:
    """The run's Hugging Face output (collective): the model, or (LoRA) the PEFT adapter folder or, with
    model.peft.merge_on_export, the merged model. `model` is this rank's GPTModel (its pipeline stage,
    sharded). An adapter folder needs its base: a run built from scratch also writes it to `<path>_base`.
    dtype: of the written weights (null: the parameters'); generation_config.json and the tokenizer's files
    come along from the checkpoint folder. final=False (an export during training) never merges adapters
    into the weights being trained: it writes the adapter folder."""
    path = Path(path)
    source = base_model_name_or_path
    if not lora_modules(model):
        return export_model(parallel, model, path, tokenizer, dtype=dtype, source=source)
    if peft_cfg.merge_on_export and final:
        merge_adapters_(model)  # the end of the run: fold adapters into the (sharded) base, export that
        return export_model(parallel, model, path, tokenizer, dtype=dtype, source=source)
    if base_model_name_or_path is None:
        base = export_model(parallel, model, path.with_name(path.name + "_base"), tokenizer, dtype=dtype)
        base_model_name_or_path = str(Path(base).resolve())
        log.info("LoRA base model (built from scratch) written to %s", base)
    gathered = gather_adapters(parallel, model)
    if gathered is not None:
        model_type = getattr(model, "hf_model_type", None) or infer_model_type(model.config)
        write_adapter_folder(path, *gathered, model.config, model_type, tokenizer, base_model_name_or_path)
    _barrier()
    return path
