"""Safetensors I/O for Hugging Face folders and the declarative name-map machinery the families share.

A family's name map is a list of `(hf_pattern, our_pattern)` pairs where `{i}` stands for a layer index;
tensors that need more than a rename (fused or transposed weights) are handled by the family itself.
Checkpoints are only ever read as safetensors: pickled `.bin` files are refused, never unpickled. A file
that is not readable safetensors (truncated, corrupt) is reported with its path. `folder_fingerprint`
identifies a folder's content cheaply (config, headers and a sample of the weight bytes), wherever it lives.
"""

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "32": torch.float32,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype} not supported; expected one of {list(DTYPE_NAMES)}")
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[str(dtype)]


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a Hugging Face model folder with config.json")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; a Hugging Face model folder needs config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: invalid JSON ({err})") from None


@contextlib.contextmanager
def open_safetensors(file: Path):
    """safe_open, with errors that name the file (a truncated download otherwise reads as a bare header error)."""
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err}); it is truncated or corrupt: download "
                         "or export it again") from None
    with handle as f:
        yield f


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (single file or sharded with an index)."""
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            files = {name: path / shard for name, shard in index["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path / INDEX_FILE}: not a valid safetensors index ({err!r})") from None
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: listed in {path / INDEX_FILE} but missing")
        return files
    if (path / SINGLE_FILE).is_file():
        with open_safetensors(path / SINGLE_FILE) as f:
            return {name: path / SINGLE_FILE for name in f.keys()}
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {pickled}: pickled checkpoints are never loaded; convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_tensors(files: dict[str, Path], names, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        with open_safetensors(file) as f:
            for name in file_names:
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as err:
                    raise ValueError(f"{file}: cannot read tensor {name!r} ({err}); the file is truncated or "
                                     "corrupt: download or export it again") from None
                # a fresh allocation: safetensors' tensors start at arbitrary offsets (e.g. 40 mod 64), and
                # misaligned weights make CPU matrix-vector products (decoding) up to 5x slower
                out[name] = _aligned(tensor).to(dtype)
    return out


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.data_ptr() % 64 == 0 else torch.empty_like(tensor).copy_(tensor)


def check_weight_files(path: Path) -> None:
    """Every weight file of a Hugging Face folder opens as safetensors (headers only: cheap)."""
    for file in sorted(set(weight_files(path).values())):
        with open_safetensors(file):
            pass


SAMPLE_BYTES = 1 << 20


def folder_fingerprint(path) -> str:
    """sha256 of a model or adapter folder's content as far as it can be read cheaply: its JSON files, and for
    each safetensors file its name, size, header and first and last MiB. Independent of where the folder is."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as f:
            if file.suffix == ".json":
                digest.update(f.read())
                continue
            digest.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    """Write one file, or shards plus an index when the total exceeds max_shard_bytes."""
    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor.contiguous()
        current_bytes += size
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=meta)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata=meta)
        weight_map.update({tensor_name: name for tensor_name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def compile_name_map(pairs):
    """[(hf_pattern, our_pattern)] with `{i}` -> two lists of (regex, template) for each direction."""
    def to_regex(pattern):
        return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
    hf_to_ours = [(to_regex(hf), ours) for hf, ours in pairs]
    ours_to_hf = [(to_regex(ours), hf) for hf, ours in pairs]
    return hf_to_ours, ours_to_hf


def rename(name: str, rules) -> str | None:
    for regex, template in rules:
        match = regex.match(name)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return None


def atomic_dir(path: Path) -> Path:
    """A sibling temporary folder to write into; `finish_atomic_dir` moves it into place."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_atomic_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            _rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _rmtree(old)
    else:
        os.replace(tmp, path)


def _rmtree(path: Path):
    import shutil

    shutil.rmtree(path)
