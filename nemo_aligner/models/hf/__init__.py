"""Load and save Hugging Face checkpoints (config.json + safetensors) as GPTModel, with no conversion step.

    model = load_pretrained("/models/Llama-3.2-1B", dtype="bf16")
    save_pretrained(model, "/results/hf", tokenizer=tok)
    rm = load_pretrained("/models/rm", task="sequence_classification")   # a ScoreModel (reward model)

A score model (`models.score.ScoreModel`) reads and writes `<Family>ForSequenceClassification` folders
(`models.hf.sequence_classification`); loading a causal LM that way starts a fresh head.

Only safetensors are read and no code from the checkpoint folder is ever executed.
"""

import json
from pathlib import Path

import torch

from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.hf.common import (
    DTYPE_NAMES, DTYPES, atomic_dir, finish_atomic_dir, read_config, read_tensors, resolve_dtype, weight_files,
    write_safetensors,
)
from nemo_aligner.models.hf.gemma2 import Gemma2Family
from nemo_aligner.models.hf.gemma3 import MULTIMODAL, Gemma3TextFamily
from nemo_aligner.models.hf.gpt2 import GPT2Family
from nemo_aligner.models.hf.llama import LlamaFamily
from nemo_aligner.models.hf.mistral import MistralFamily
from nemo_aligner.models.hf.olmo2 import Olmo2Family
from nemo_aligner.models.hf.phi3 import Phi3Family
from nemo_aligner.models.hf.qwen2 import Qwen2Family
from nemo_aligner.models.hf.qwen3 import Qwen3Family
from nemo_aligner.models.hf.sequence_classification import (
    SequenceClassificationNames, check_num_labels, config_keys, fill_fresh_head,
)
from nemo_aligner.models.lora import base_weights
from nemo_aligner.models.score import CAUSAL_LM, is_score_model, model_class

FAMILIES = {f.model_type: f for f in (LlamaFamily(), MistralFamily(), Qwen2Family(), GPT2Family(), Qwen3Family(),
                                      Gemma2Family(), Gemma3TextFamily(), Phi3Family(), Olmo2Family())}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
# model types we know and refuse with a reason (rather than "not supported")
REFUSED_MODEL_TYPES = {"gemma3": MULTIMODAL}

__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "config_from_pretrained", "load_pretrained", "save_pretrained",
           "infer_model_type", "tensor_names"]


def _family(model_type, source: str):
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"{source}: {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]


def config_from_pretrained(path) -> tuple[GPTConfig, str]:
    """(GPTConfig, model_type) from a Hugging Face folder's config.json."""
    path = Path(path)
    hf = read_config(path)
    source = str(path / "config.json")
    family = _family(hf.get("model_type"), source)
    try:
        return family.read_config(hf, source), family.model_type
    except KeyError as err:
        raise ValueError(f"{source}: missing key {err} required for model_type {family.model_type!r}") from None


def tensor_names(model, model_type: str):
    """The name map of `model`'s Hugging Face layout: the family's (causal LM) or its sequence classifier's."""
    family = FAMILIES[model_type]
    return SequenceClassificationNames(family) if is_score_model(model) else family


def load_pretrained(path, dtype="fp32", device="cpu", prune=None, task: str = CAUSAL_LM, seed: int = 0) -> GPTModel:
    """Build a GPTModel from a Hugging Face folder. dtype: fp32 | bf16 | fp16 (or a torch dtype).

    prune(model) -> model: drops modules before any weight is read (a pipeline stage reads only its own
    layers' tensors). task: causal_lm (GPTModel) or sequence_classification (ScoreModel: the folder's
    score head, or a fresh one drawn with `seed` from a causal-LM folder)."""
    path = Path(path)
    dtype = resolve_dtype(dtype)
    config, model_type = config_from_pretrained(path)
    files = weight_files(path)
    with torch.device("meta"):
        model = model_class(task)(config)
    family = tensor_names(model, model_type)
    names = [n for n in files if not family.is_ignored(n)]
    if config.share_embeddings_and_output_weights:
        names = [n for n in names if n != "lm_head.weight"]  # some writers store the tied copy too
    if prune is not None:
        model = prune(model)
        wanted = set(family.to_hf(model.state_dict()))  # the HF names of what is left (meta tensors: no data)
        names = [n for n in names if n in wanted]
    hf_tensors = read_tensors(files, names, dtype)
    try:
        tensors, sources = family.from_hf(hf_tensors, config)
    except KeyError as err:
        name = err.args[0]
        raise ValueError(f"{files[name]}: unexpected tensor {name!r} for model_type {model_type!r}"
                         f"{_task_hint(name, task)}") from None
    if is_score_model(model):
        _read_score_config(model, path)
        fill_fresh_head(model, tensors, sources, seed, path)
    _check_tensors(model, tensors, sources, files, path)
    model.load_state_dict(tensors, assign=True, strict=True)
    model.hf_model_type = model_type
    return model.to(device)


def _task_hint(name: str, task: str) -> str:
    if name == "score.weight" and task == CAUSAL_LM:
        return " (a sequence-classification / reward model: load it with task='sequence_classification')"
    return ""


def _read_score_config(model, path: Path) -> None:
    hf = read_config(path)
    check_num_labels(hf, str(path / "config.json"))
    model.pad_token_id = hf.get("pad_token_id")


def _check_tensors(model, tensors, sources, files, path):
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s) that config.json implies, "
                         f"e.g. {missing[:3]} (our names)")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            source = sources[name]
            raise ValueError(f"{files[source]}: tensor {source!r} has shape {list(got)} but config.json implies "
                             f"{list(shape)} for {name!r}")


def infer_model_type(config: GPTConfig) -> str:
    """The family a from-scratch config exports as when none is named (each option points to the one family that
    has it; a config without any of them exports as before)."""
    if config.norm_placement == "sandwich":
        return "gemma3_text" if config.qk_norm == "head" else "gemma2"
    if config.norm_placement == "post":
        return "olmo2"
    if config.qk_norm == "head":
        return "qwen3"
    if config.rope_scaling == "longrope" or config.rotary_percent != 1.0:
        return "phi3"
    if config.position_embedding_type == "learned_absolute":
        return "gpt2"
    if config.add_qkv_bias and not config.add_bias_linear:
        return "qwen2"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


def checkpoint_dtype(path) -> str | None:
    """The dtype a Hugging Face folder's weights are stored in, from config.json (`torch_dtype`, or transformers 5's
    `dtype`); a PEFT adapter folder answers for its base when that is a local folder; None when unknown."""
    path = Path(path)
    if not (path / "config.json").is_file():
        base = _adapter_base(path)
        return checkpoint_dtype(base) if base is not None else None
    config = read_config(path)
    name = config.get("torch_dtype") or config.get("dtype")
    return name if isinstance(name, str) and name in DTYPES else None


def _adapter_base(path: Path) -> Path | None:
    adapter = path / "adapter_config.json"
    if not adapter.is_file():
        return None
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    return Path(base) if base and Path(base).is_dir() else None


def hf_config_dict(model: GPTModel, model_type: str, dtype: torch.dtype, tokenizer=None) -> dict:
    family = _family(model_type, "save_pretrained")
    hf = {"model_type": model_type, "architectures": [family.architecture], **family.config_to_hf(model.config),
          "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if is_score_model(model):  # <Family>ForSequenceClassification, one label
        hf.update(config_keys(model_type, tokenizer.pad_id if tokenizer is not None else model.pad_token_id))
    return hf


def save_pretrained(model: GPTModel, path, tokenizer=None, model_type: str | None = None, dtype=None,
                    max_shard_size_bytes: int = 5 * 2**30, state_dict: dict | None = None) -> Path:
    """Write a Hugging Face folder atomically (temporary folder renamed into place).

    state_dict: our tensor names -> full tensors, when the caller has gathered them (e.g. from shards);
    defaults to the model's own. dtype defaults to the parameters' dtype. With LoRA applied this writes
    the base model (adapters left out): use models.hf.peft.save_adapters / save_merged for those.
    """
    path = Path(path)
    model_type = model_type or getattr(model, "hf_model_type", None) or infer_model_type(model.config)
    # LoRA-wrapped models: the base weights under their original names (adapters: models.hf.peft).
    tensors = base_weights(state_dict if state_dict is not None else model.state_dict())
    dtype = resolve_dtype(dtype) if dtype is not None else next(iter(tensors.values())).dtype
    config = hf_config_dict(model, model_type, dtype, tokenizer)
    hf_tensors = tensor_names(model, model_type).to_hf({k: v.detach().to("cpu", dtype) for k, v in tensors.items()})
    tmp = atomic_dir(path)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(hf_tensors, tmp, max_shard_size_bytes)
    if tokenizer is not None:
        tokenizer.save(tmp)
    finish_atomic_dir(tmp, path)
    return path
