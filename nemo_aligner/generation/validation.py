"""Samples at validation (exp_manager.val_samples): replies to the first validation prompts, generated with
the training model after every validation and logged to `<log_dir>/val_samples.jsonl` (one line per
validation: step, then prompt / reply / finish reason per sample) and TensorBoard (text `val/samples`).

The prompts are the validation examples' own prompt tokens (what the model is trained to continue: a DPO
pair's prompt, an SFT example's tokens before its first label), so the chat template and BOS are exactly
training's. All ranks generate (tensor parallel needs every shard); rank 0 writes.
"""

import json
import logging
from pathlib import Path

from nemo_aligner.generation.params import SamplingParams
from nemo_aligner.generation.prompts import eos_token_ids
from nemo_aligner.generation.sampler import Sampler

log = logging.getLogger("nemo_aligner")
SAMPLES_FILE = "val_samples.jsonl"


def example_prompt_ids(example) -> list[int]:
    """The prompt of a tokenised example: an online-RL prompt's `prompt_ids`, a preference pair's `prompt`, else
    the tokens before the first label."""
    if hasattr(example, "prompt_ids"):
        return [int(t) for t in example.prompt_ids]
    if hasattr(example, "prompt"):
        return [int(t) for t in example.prompt]
    first_label = int(example.label_mask.argmax())
    return [int(t) for t in example.ids[:first_label]]


class ValidationSamples:
    """Called by the training loop after each validation with the optimiser step (0 = before training)."""

    def __init__(self, sampler, tokenizer, prompts: list[list[int]], params: SamplingParams, log_dir, *,
                 is_rank_zero: bool = True, tensorboard: bool = True):
        self.sampler, self.tokenizer, self.prompts, self.params = sampler, tokenizer, prompts, params
        self.path = Path(log_dir) / SAMPLES_FILE
        self.is_rank_zero = is_rank_zero
        self._writer = None
        if is_rank_zero and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(log_dir) / "tensorboard"))

    def __call__(self, step: int) -> list[dict]:
        completions = self.sampler.generate(self.prompts, self.params)
        samples = [{"prompt": self.tokenizer.decode(self.prompts[c.prompt_index]), "reply": c.text,
                    "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)} for c in completions]
        if self.is_rank_zero:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "samples": samples}, ensure_ascii=False) + "\n")
            if self._writer is not None:
                self._writer.add_text("val/samples", _markdown(samples), step)
                self._writer.flush()
            log.info("val samples at step %d: %s", step, " | ".join(repr(s["reply"][:60]) for s in samples[:3]))
        return samples

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _keep_lines_up_to(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if step > 0 and json.loads(line)["step"] <= step]
    path.write_text("".join(kept), encoding="utf-8")


def _markdown(samples: list[dict]) -> str:
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    rows = [f"| {cell(s['prompt'][-300:])} | {cell(s['reply'])} | {s['finish_reason']} |" for s in samples]
    return "\n".join(["| prompt | reply | finish |", "|---|---|---|", *rows])


def validation_samples(start, run, val_data, resume_step: int = 0):
    """The loop's after-validation hook for exp_manager.val_samples, or None when off (num_prompts 0, no
    validation data). Checks at start-up that the layout can generate. A resumed run keeps the lines up to
    its checkpoint's step (as metrics.jsonl does); a fresh one starts the file anew."""
    settings = start.cfg.exp_manager.val_samples
    if settings.num_prompts == 0 or val_data is None:
        return None
    dataset = val_data.dataset
    prompts = [example_prompt_ids(dataset.examples[i]) for i in range(min(settings.num_prompts, len(dataset)))]
    restore = start.restore if start.restore and Path(start.restore).is_dir() else None
    sampler = Sampler.for_run(run, start.tokenizer, eos_token_ids(start.tokenizer, restore), autocast=start.autocast)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed)
    if start.parallel.is_rank_zero:
        _keep_lines_up_to(start.log_dir / SAMPLES_FILE, resume_step)
    return ValidationSamples(sampler, start.tokenizer, prompts, params, start.log_dir,
                             is_rank_zero=start.parallel.is_rank_zero,
                             tensorboard=start.cfg.exp_manager.create_tensorboard_logger)
