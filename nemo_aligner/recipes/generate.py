"""The generate recipe: a checkpoint and a prompts file in, completions with token ids, log-probs and finish
reasons out (examples/nlp/gpt/generate.py).

`pretrained_checkpoint.restore_from_path` may be a Hugging Face folder, a PEFT adapter folder (its base
from `base_model_name_or_path` in adapter_config.json, a local folder) or a training run's log dir (its
`hf/` export). Prompts are rendered as training renders them (`generation.prompts`); every prompt is
checked before the model is loaded. Under torchrun with model.tensor_model_parallel_size > 1 the model is
laid out as training lays it out (ParallelRun) and rank 0 writes the output.
"""

import json
import logging
import os
import time
from pathlib import Path

import torch

from nemo_aligner.config.generate import GenerateRunConfig
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.generation import Sampler, SamplingParams, eos_token_ids, prompt_token_ids
from nemo_aligner.generation.prompts import read_prompt_rows
from nemo_aligner.losses.logprobs import LogProbHead
from nemo_aligner.models.hf import load_pretrained
from nemo_aligner.models.hf.peft import ADAPTER_CONFIG, load_adapters, read_adapter_config
from nemo_aligner.parallel.generation import check_generation_layout
from nemo_aligner.parallel.mesh import init_parallel
from nemo_aligner.parallel.run import ParallelRun
from nemo_aligner.recipes.skeleton import pick_device, setup_logging

log = logging.getLogger("nemo_aligner")


def resolve_checkpoint(path) -> tuple[Path, Path | None]:
    """(Hugging Face model folder, PEFT adapter folder or None) for pretrained_checkpoint.restore_from_path."""
    key = "pretrained_checkpoint.restore_from_path"
    if not path:
        raise ValueError(f"{key} is not set; expected a Hugging Face folder, a PEFT adapter folder or a training "
                         "run's log dir")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{key}={path}: no such folder")
    if (folder / ADAPTER_CONFIG).is_file():
        base = read_adapter_config(folder).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise ValueError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path={base!r} is not a local Hugging Face "
                             "folder (config.json); models are never downloaded")
        return Path(base), folder
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "hf").is_dir():  # a training run's log dir: its final export
        return resolve_checkpoint(folder / "hf")
    if (folder / "trainer_state.json").is_file():
        raise ValueError(f"{key}={path} is a resumable training checkpoint (DCP shards without the architecture, "
                         "and for LoRA without the base and the adapters' scale); point at the run's log dir or its "
                         "hf/ export (written when the run ends)")
    raise ValueError(f"{key}={path}: no config.json, {ADAPTER_CONFIG} or hf/ inside; expected a Hugging Face folder, "
                     "a PEFT adapter folder or a training run's log dir")


def load_prompts(cfg: GenerateRunConfig, tokenizer) -> tuple[list[dict], list[list[int]]]:
    gen = cfg.generation
    if not gen.input_file:
        raise ValueError("generation.input_file is not set; expected a jsonl file with a `prompt` column")
    rows = read_prompt_rows(gen.input_file, gen.prompt_key)
    ids = [prompt_token_ids(row[gen.prompt_key], tokenizer, gen.chat_template, gen.add_bos, where)
           for where, row in rows]
    return [row for _, row in rows], ids


def build_engine(cfg: GenerateRunConfig, parallel, model, model_dir, tokenizer, eos_ids, has_adapters: bool):
    gen = cfg.generation
    if gen.backend == "vllm":
        from nemo_aligner.generation.vllm_engine import VLLMEngine

        if parallel.distributed:
            raise ValueError("generation.backend=vllm runs in one process here; launch without torchrun (vLLM has "
                             "its own tensor parallel) or use generation.backend=builtin")
        dtype = "bfloat16" if gen.precision == "bf16" else "float32"
        engine = VLLMEngine(str(model_dir), tokenizer, eos_ids, dtype=dtype, max_num_seqs=gen.batch_size, seed=gen.seed,
                            scorer=model, kv_cache_gib=gen.vllm_kv_cache_gib)
        if has_adapters:
            engine.sync_weights(model)  # LoRA adapters: vLLM read the base; send the merged weights
        return engine
    run = ParallelRun(parallel, model, LogProbHead())
    return Sampler.for_run(run, tokenizer, eos_ids, batch_size=gen.batch_size)


def run_generate(cfg: GenerateRunConfig) -> dict:
    setup_logging()
    gen = cfg.generation
    processes, tp = cfg.trainer.num_nodes * cfg.trainer.devices, cfg.model.tensor_model_parallel_size
    if processes != tp:  # one replica: every process holds a tensor-parallel shard of the same model
        raise ValueError(f"generate runs one model replica: trainer.num_nodes x trainer.devices = {processes} must "
                         f"equal model.tensor_model_parallel_size = {tp}")
    parallel = init_parallel(cfg.trainer, cfg.model)
    check_generation_layout(parallel.dims)
    if not gen.output_file:
        raise ValueError("generation.output_file is not set; expected the path of the jsonl file to write")
    model_dir, adapter_dir = resolve_checkpoint(cfg.pretrained_checkpoint.restore_from_path)
    adapter_has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer.json").is_file()
    tokenizer_path = cfg.model.tokenizer.path or (adapter_dir if adapter_has_tokenizer else model_dir)
    tokenizer = Tokenizer.from_path(tokenizer_path, cfg.model.tokenizer.type)
    rows, prompts = load_prompts(cfg, tokenizer)  # bad rows stop here, before the model is read
    eos_ids = eos_token_ids(tokenizer, model_dir)
    params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                            top_p=gen.top_p, num_samples=gen.num_samples, seed=gen.seed, stop=tuple(gen.stop))
    model = load_pretrained(model_dir, dtype="bf16" if gen.precision == "bf16" else "fp32",
                            device=pick_device(cfg.trainer.accelerator))
    if adapter_dir is not None:
        load_adapters(model, adapter_dir)
    model.eval()
    log.info("generate: %d prompts x %d samples from %s%s, backend %s, eos ids %s", len(prompts), gen.num_samples,
             model_dir, f" + adapters {adapter_dir}" if adapter_dir else "", gen.backend, list(eos_ids))
    engine = build_engine(cfg, parallel, model, model_dir, tokenizer, eos_ids, adapter_dir is not None)
    completions, seconds = generate_all(engine, prompts, params, gen.batch_size,
                                        gen.progress_bar and parallel.is_rank_zero)
    if parallel.is_rank_zero:
        write_output(gen.output_file, rows, completions, gen.num_samples)
    tokens = sum(len(c.token_ids) for c in completions)
    result = {"prompts": len(prompts), "completions": len(completions), "tokens": tokens, "seconds": seconds,
              "tokens_per_sec": tokens / seconds if seconds > 0 else 0.0, "output_file": gen.output_file}
    log.info("done: %d prompts, %d completions, %d tokens in %.1fs (%.1f tokens/s); wrote %s", len(prompts),
             len(completions), tokens, seconds, result["tokens_per_sec"], gen.output_file)
    return result


def generate_all(engine, prompts, params, batch_size: int, progress: bool):
    """Completions of every prompt (a batch of prompts at a time, for the progress bar) and the seconds it took."""
    from tqdm import tqdm

    per_call = max(1, batch_size // params.num_samples)
    out, start = [], time.perf_counter()
    with tqdm(total=len(prompts), disable=not progress, unit="prompt", desc="generate", dynamic_ncols=True) as bar:
        for first in range(0, len(prompts), per_call):
            out.extend(engine.generate(prompts[first:first + per_call], params, first_index=first))
            bar.update(min(per_call, len(prompts) - first))
            bar.set_postfix_str(f"{sum(len(c.token_ids) for c in out) / (time.perf_counter() - start):.1f} tok/s")
    return out, time.perf_counter() - start


def write_output(path, rows, completions, num_samples: int) -> None:
    """Each input row plus completions, completion_token_ids, completion_logprobs, finish_reasons (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            mine = completions[i * num_samples:(i + 1) * num_samples]
            assert [c.prompt_index for c in mine] == [i] * num_samples
            f.write(json.dumps({**row, "completions": [c.text for c in mine],
                                "completion_token_ids": [c.token_ids for c in mine],
                                "completion_logprobs": [c.logprobs for c in mine],
                                "finish_reasons": [c.finish_reason for c in mine]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
