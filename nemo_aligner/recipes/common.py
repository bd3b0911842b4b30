"""Pieces every training recipe assembles from a validated config: output folder, tokenizer, model,
precision, optimiser, logger. Each is a small function so recipes stay a readable list of steps."""

import contextlib
from dataclasses import dataclass
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch

from nemo_aligner.config import gpt_config_from_model
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.models.compile import compile_blocks
from nemo_aligner.models.gpt import GPTModel
from nemo_aligner.models.hf import load_pretrained

log = logging.getLogger("nemo_aligner")


def setup_logging():
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[nemo_aligner] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def log_dir_from(exp) -> Path:
    if exp.explicit_log_dir:
        return Path(exp.explicit_log_dir)
    if exp.exp_dir:
        return Path(exp.exp_dir) / exp.name
    raise ValueError("exp_manager.explicit_log_dir and exp_manager.exp_dir are both null; set one")


DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "demo" / "tokenizer"


def load_tokenizer(model_cfg, restore_from_path) -> Tokenizer:
    """model.tokenizer.path, else the checkpoint's folder, else (a from-scratch model) the demo tokenizer."""
    path = model_cfg.tokenizer.path or restore_from_path
    if path is None:
        if not DEMO_TOKENIZER.is_dir():
            raise ValueError("no tokenizer: set model.tokenizer.path (or pretrained_checkpoint.restore_from_path "
                             "to a Hugging Face folder that has one)")
        log.info("model.tokenizer.path is null and there is no checkpoint: using the demo tokenizer %s",
                 DEMO_TOKENIZER)
        path = DEMO_TOKENIZER
    return Tokenizer.from_path(path, model_cfg.tokenizer.type)


def build_model(model_cfg, restore_from_path, tokenizer, device, prune=None) -> GPTModel:
    """prune(model) -> model: with a checkpoint, applied before its weights are read (pipeline stages)."""
    if restore_from_path:
        model = load_pretrained(restore_from_path, dtype="fp32", device=device, prune=prune)
        model.config.activations_checkpointing = model_cfg.activations_checkpoint_granularity is not None
    else:
        torch.manual_seed(model_cfg.seed)
        model = GPTModel(gpt_config_from_model(model_cfg, tokenizer.vocab_size)).to(device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; use the checkpoint's tokenizer (model.tokenizer.path)")
    if (model.config.position_embedding_type == "learned_absolute"
            and model_cfg.seq_length > model.config.max_position_embeddings):
        raise ValueError(f"model.data.seq_length / model.encoder_seq_length={model_cfg.seq_length} exceeds the "
                         f"model's max_position_embeddings={model.config.max_position_embeddings}")
    if model_cfg.compile:  # lazy: compiles at the first forward, so later parallel wrapping is seen too
        compile_blocks(model)
    return model


def model_identity(model, model_cfg, restore_from_path) -> str:
    """A cheap, stable description of the initial weights (for the reference log-prob cache key)."""
    if restore_from_path:
        files = sorted(Path(restore_from_path).glob("*.safetensors")) + [Path(restore_from_path) / "config.json"]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return json.dumps({"path": str(Path(restore_from_path).resolve()), "files": stats})
    return json.dumps({"scratch": model.config.to_dict(), "seed": model_cfg.seed}, sort_keys=True)


def cache_key(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:24]


@dataclass
class RunStart:
    """What every recipe sets up first, in the same order."""

    restore: str | None
    log_dir: Path
    device: torch.device
    autocast: object
    tokenizer: Tokenizer


def start_run(cfg) -> RunStart:
    """Checkpoint path, output folder, device, precision context and tokenizer from a run config."""
    restore = cfg.pretrained_checkpoint.restore_from_path
    log_dir = log_dir_from(cfg.exp_manager)
    log_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.trainer.accelerator)
    return RunStart(restore, log_dir, device, autocast_for(cfg.trainer.precision, device),
                    load_tokenizer(cfg.model, restore))


def log_reports(datasets: dict):
    for name, ds in datasets.items():
        if ds is not None:
            log.info(ds.report.summary(name))


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator!r} but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(precision: str, device: torch.device):
    """bf16/fp16 mixed precision: parameters stay fp32 (master weights), matmuls run in low precision."""
    if precision in ("bf16", "bf16-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16", "16-mixed"):
        raise ValueError(f"trainer.precision={precision!r} (fp16) is not supported: it needs loss scaling; "
                         "use bf16-mixed or 32")
    return contextlib.nullcontext()
