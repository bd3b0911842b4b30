"""DPO side by side with TRL's `DPOTrainer`: the same model, pairs, batches and hyperparameters, one
invocation, each side a whole job in its own process.

    python benchmarks/bench_dpo_vs_trl.py                                  # SmolLM2-135M shape, random weights
    python benchmarks/bench_dpo_vs_trl.py --model /work/tools/smollm2-135m-instruct --repeats 3
    python benchmarks/bench_dpo_vs_trl.py --bf16 --trl-python /work/venvs/trl/bin/python

What runs. A Hugging Face folder (SmolLM2-135M's shape: llama, 30 layers, hidden 576, GQA 9/3, FFN 1536,
vocabulary 49,152, tied embeddings; random weights written once, or --model) and a jsonl of --pairs
realistic pairs written once: a context of several sentences and a question (prompts ~4-6x longer than the
responses, as in HH or UltraFeedback-style prompts with short answers), two answers. Then, alternating,
--repeats times each (the best wall counts; the spread is printed):
  trl       TRL 1.16 DPOTrainer (loss sigmoid, its default reference: a frozen copy run every step),
            with the TRL venv's python (--trl-python; TRL is a dependency of this benchmark only)
  ours      examples/nlp/gpt/train_gpt_dpo.py's recipe (run_dpo), shared prompts on (the default),
            reference log-probs precomputed (the default)
  unshared  ours with model.data.shared_prompt=false
  bf16      ours under trainer.precision=bf16-mixed (--bf16), against the fp32 trajectory
  recompute ours with activation recomputation (model.activations_checkpoint_granularity=full): memory
Both sides: fp32, steps of --batch pairs in file order (no shuffling: TRL's sampler is replaced by a
sequential one), constant lr, no warm-up, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), gradient
clipping at 1.0, beta 0.1, no validation, no intermediate checkpoint, the final model saved once (TRL
`save_model`, ours the hf/ export). The benchmark checks that both sides tokenised every pair to the
same ids.

Reported per side: whole-job wall (process start to exit: imports, data, model load, reference pass,
training, save), training-step time (the sum of the optimiser steps, and the median step), tokens/s
(prompt + response tokens of both sequences of every pair, over the step time: the same count for every
side, whatever it computes), peak RSS (the process's maximum resident set), and each trajectory's largest
difference from TRL's per-step losses; the ratios to TRL; and the memory floor of full-parameter AdamW in
fp32 (params + grads + two moments = 16 bytes per trainable parameter).
"""

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's nemo_aligner, here and in the children (PYTHONPATH)
DEFAULT_TRL_PYTHON = "/work/venvs/trl/bin/python"
DEFAULT_TOKENIZER = "/work/tools/smollm2-135m-instruct"
SMOLLM2_135M = dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                    kv_channels=64, vocab_size=49152, rotary_base=100000.0, layernorm_epsilon=1e-5,
                    share_embeddings_and_output_weights=True, max_position_embeddings=8192)
WORDS = ("river mountain ancient library city harbor winter summer engine theory market garden village science "
         "history bridge forest planet ocean island kingdom treaty railway painter museum festival castle desert "
         "valley merchant scholar battle storm copper silver wheat cotton language music temple canal border "
         "province republic emperor harvest voyage comet glacier volcano tribe council").split()


# ------------------------------------------------------------------------------------------ inputs
def make_pairs(n: int, seed: int) -> list[dict]:
    """Factual-style pairs: a context of 5-9 sentences and a question (the prompt), a short right answer
    and a short wrong one; the prompt is several times longer than either response."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, other = rng.sample(WORDS, 2)
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 18))).capitalize() + "."
                     for _ in range(rng.randint(5, 9))]
        year = 1200 + rng.randrange(800)
        prompt = (f"Context: The {topic} of {other} was first described in {year}. " + " ".join(sentences)
                  + f"\nQuestion {i}: In which year was the {topic} of {other} first described, and why does it "
                  f"matter?\nAnswer:")
        reason = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        wrong_reason = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        rows.append({"prompt": prompt, "chosen": f" It was first described in {year}; it matters because of the "
                     f"{reason}.", "rejected": f" It was first described in {year + rng.randint(5, 90)}; it "
                     f"matters because of the {wrong_reason}."})
    return rows


def write_inputs(args, work: Path) -> tuple[Path, Path]:
    """(model folder, pairs jsonl): --model, or random weights of SmolLM2-135M's shape with its tokenizer."""
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, args.seed)))
    if args.model:
        return Path(args.model), data
    folder = work / "model"
    if not (folder / "config.json").is_file():
        import torch

        from nemo_aligner.data.tokenizer import Tokenizer
        from nemo_aligner.models.gpt import GPTConfig, GPTModel
        from nemo_aligner.models.hf import save_pretrained

        torch.manual_seed(args.seed)
        model = GPTModel(GPTConfig(**SMOLLM2_135M))
        save_pretrained(model, folder, tokenizer=Tokenizer.from_path(args.tokenizer), model_type="llama")
    return folder, data


# ------------------------------------------------------------------------------------------ children
def _pair_digest(prompt, chosen, rejected) -> str:
    return hashlib.sha256(json.dumps([list(map(int, prompt)), list(map(int, chosen)), list(map(int, rejected))])
                          .encode()).hexdigest()[:16]


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_ours(spec: dict) -> dict:
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(spec["threads"])
    from nemo_aligner.config import DPORunConfig, load_config
    from nemo_aligner.recipes.dpo import run_dpo

    log_dir = Path(spec["log_dir"])
    overrides = [
        f"pretrained_checkpoint.restore_from_path={spec['model']}", f"exp_manager.explicit_log_dir={log_dir}",
        f"model.data.data_prefix.train=[{spec['data']}]", "model.data.shuffle=false", "model.data.add_bos=false",
        f"model.data.shared_prompt={spec['shared_prompt']}", f"model.global_batch_size={spec['batch']}",
        f"model.micro_batch_size={spec['micro_batch']}", "model.encoder_seq_length=1024",
        f"model.optim.lr={spec['lr']}", "model.optim.weight_decay=0.0", "model.optim.betas=[0.9,0.999]",
        "model.optim.eps=1e-8", "model.optim.sched.name=constant", "model.optim.sched.warmup_steps=0",
        f"model.dpo.ref_policy_kl_penalty={spec['beta']}", f"model.dpo.logprob_chunk_size={spec['chunk']}",
        f"trainer.dpo.max_steps={spec['steps']}", "trainer.dpo.limit_val_batches=0",
        "trainer.dpo.gradient_clip_val=1.0", f"trainer.precision={spec['precision']}",
        "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.progress_bar=false", "exp_manager.resume_if_exists=false",
    ] + spec.get("extra", [])
    phases = _time_phases()
    t0 = time.perf_counter()
    run_dpo(load_config(OmegaConf.from_dotlist(overrides), DPORunConfig))
    phases["run_dpo"] = time.perf_counter() - t0
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["train/loss"] for r in rows], "step_times": [r["train/step_time"] for r in rows],
            "peak_rss": _rss_bytes(), "cpu": _cpu_seconds(), "phases": phases}


def _time_phases() -> dict:
    """Wall seconds of the recipe's phases (wrapped where the recipe looks them up)."""
    import nemo_aligner.recipes.dpo as dpo
    import nemo_aligner.recipes.skeleton as skeleton
    import nemo_aligner.training.logging as logging_module
    import nemo_aligner.training.loop as loop

    phases = {}

    def timed(owner, name, label):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, wrapper)

    for owner, name, label in ((dpo, "start_run", "start (tokenizer, layout)"), (dpo, "load_layouts", "data"),
                               (dpo, "build_policy", "model load"), (dpo, "setup_reference", "reference pass"),
                               (loop.Trainer, "fit", "fit (steps)"), (skeleton, "final_export", "hf export"),
                               (logging_module, "plot_curves", "curves.png")):
        timed(owner, name, label)
    return phases


def _our_pairs(model, data):
    """Our tokenisation of the pairs (what run_dpo trains on, computed here, outside the timed job)."""
    from nemo_aligner.data.dataset import TokenizeSettings
    from nemo_aligner.data.preference.dataset import PreferenceDataset
    from nemo_aligner.data.tokenizer import Tokenizer

    return PreferenceDataset.from_files([str(data)], Tokenizer.from_path(model),
                                        TokenizeSettings(seq_length=1024, add_bos=False)).pairs


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    losses, step_times = [], []

    class Sequential(DPOTrainer):  # same batches as ours: file order, no shuffling
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            losses.append(float((out[0] if return_outputs else out).detach()))  # unrounded (the logs round)
            return out

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    config = DPOConfig(
        output_dir=spec["log_dir"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=spec["beta"],
        max_steps=spec["steps"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0, max_length=1024,
        bf16=False, fp16=False,
    )
    trainer = Sequential(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[StepTimes()])
    trainer.train()
    trainer.save_model(str(Path(spec["log_dir"]) / "final"))
    digests = [_pair_digest(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    return {"losses": losses, "step_times": step_times, "peak_rss": _rss_bytes(), "cpu": _cpu_seconds(),
            "digests": digests}


def run_child(kind: str, spec: dict, python: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]))
    print(f"  running {spec['name']} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([python, __file__, "--_child", kind, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{spec['name']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall": wall}
    Path(spec["log_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["log_dir"]) / "bench_result.json").write_text(json.dumps(result))  # kept if a later side fails
    return result


# ------------------------------------------------------------------------------------------ report
def summarise(runs: list[dict], tokens: int) -> dict:
    best = min(runs, key=lambda r: r["wall"])
    train = [sum(r["step_times"]) for r in runs]
    return {"wall": best["wall"], "walls": [r["wall"] for r in runs], "train": min(train), "trains": train,
            "median_step": statistics.median(best["step_times"]), "tokens_per_s": tokens / min(train),
            "peak_rss": min(r["peak_rss"] for r in runs), "rss_all": [r["peak_rss"] for r in runs],
            "cpu": min(r["cpu"] for r in runs), "losses": best["losses"], "digests": best.get("digests"),
            "phases": best.get("phases")}


def _spread(values, fmt="{:.1f}") -> str:
    return "/".join(fmt.format(v) for v in values)


def report(results: dict, args, tokens: int, num_params: int, ours_digests: list):
    trl = results.get("trl")
    gib = 2**30
    print(f"\n{args.pairs} pairs, {args.pairs // args.batch} steps of {args.batch} pairs; {tokens:,} sequence tokens per epoch "
          f"(prompt + response, both sequences); model {'--model ' + args.model if args.model else 'SmolLM2-135M shape, random weights'} "
          f"({num_params / 1e6:.1f}M parameters); {args.threads} threads; best of {args.repeats} (all runs after '|')")
    print(f"memory floor, full-parameter AdamW fp32 (16 B/param): {16 * num_params / gib:.2f} GiB\n")
    header = (f"{'side':<10} {'wall s':>7} {'cpu s':>7} {'train s':>8} {'step s':>7} {'tokens/s':>9} {'peak GiB':>9} "
              f"{'wall x':>7} {'train x':>8} {'mem x':>6} {'max |dloss|':>12}   spread: wall | train | peak GiB")
    print(header)
    for name, r in results.items():
        ratios = ("", "", "")
        diff = ""
        if trl is not None:
            ratios = (f"{trl['wall'] / r['wall']:.2f}", f"{trl['train'] / r['train']:.2f}",
                      f"{r['peak_rss'] / trl['peak_rss']:.2f}")
            reference = trl["losses"] if name != "bf16" or "ours" not in results else results["ours"]["losses"]
            diff = f"{max(abs(a - b) for a, b in zip(r['losses'], reference)):.2e}"
        print(f"{name:<10} {r['wall']:>7.1f} {r['cpu']:>7.1f} {r['train']:>8.1f} {r['median_step']:>7.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['peak_rss'] / gib:>9.2f} {ratios[0]:>7} {ratios[1]:>8} {ratios[2]:>6} {diff:>12}   "
              f"{_spread(r['walls'])} | {_spread(r['trains'])} | {_spread([v / gib for v in r['rss_all']], '{:.2f}')}")
    if trl is not None:
        print("\nx: TRL's wall / ours and TRL's train / ours (speed-up), our peak / TRL's (memory); max |dloss|: the "
              "largest per-step difference from TRL's losses (bf16: from ours in fp32)")
        print(f"token ids of every pair identical on both sides: {ours_digests == trl['digests']}")
    for name, r in results.items():
        print(f"losses {name:<9}", " ".join(f"{v:.6f}" for v in r["losses"]))
    for name, r in results.items():
        if r.get("phases"):
            print(f"phases {name:<9}", ", ".join(f"{k} {v:.1f}s" for k, v in r["phases"].items()),
                  f"(python start + imports: {r['wall'] - r['phases']['run_dpo']:.1f}s)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face folder (default: random weights of SmolLM2-135M's shape)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder for the random-weight model")
    p.add_argument("--pairs", type=int, default=72)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimiser step (both sides)")
    p.add_argument("--micro-batch", type=int, default=8, help="our micro-batch (pairs per forward; the math is "
                   "the same for any value)")
    p.add_argument("--chunk", type=int, default=1024, help="our model.dpo.logprob_chunk_size")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="trl,ours,unshared", help="comma-separated: trl, ours, unshared, bf16, recompute")
    p.add_argument("--bf16", action="store_true", help="also ours under bf16-mixed")
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="python of a venv with trl, datasets, accelerate")
    p.add_argument("--workdir", help="keep inputs and outputs here (default: a temporary folder)")
    p.add_argument("--extra", action="append", default=[], help="more overrides for our side, e.g. "
                   "model.activations_checkpoint_granularity=full")
    p.add_argument("--_child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    return p.parse_args()


def main():
    args = parse_args()
    if args._child:
        result = (child_ours if args._child == "ours" else child_trl)(json.loads(args.spec))
        print(json.dumps(result))
        return
    sides = [s for s in args.sides.split(",") if s] + (["bf16"] if args.bf16 and "bf16" not in args.sides else [])
    if "trl" in sides and not Path(args.trl_python).is_file():
        sys.exit(f"--trl-python {args.trl_python} not found: make a venv with torch==2.13.0 (first), trl, datasets "
                 "and accelerate, or run --sides ours,unshared")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_dpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = write_inputs(args, work)
    steps = args.pairs // args.batch
    base = dict(model=str(model), data=str(data), batch=args.batch, micro_batch=args.micro_batch, lr=args.lr,
                beta=args.beta, steps=steps, threads=args.threads, seed=args.seed, chunk=args.chunk)
    specs = {
        "trl": ("trl", dict(base, name="trl"), args.trl_python),
        "ours": ("ours", dict(base, name="ours", shared_prompt=True, precision="32", extra=args.extra), sys.executable),
        "unshared": ("ours", dict(base, name="unshared", shared_prompt=False, precision="32", extra=args.extra),
                     sys.executable),
        "bf16": ("ours", dict(base, name="bf16", shared_prompt=True, precision="bf16-mixed", extra=args.extra),
                 sys.executable),
        "recompute": ("ours", dict(base, name="recompute", shared_prompt=True, precision="32",
                                   extra=["model.activations_checkpoint_granularity=full", *args.extra]),
                      sys.executable),
    }
    runs = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in sides:
            kind, spec, python = specs[side]
            runs[side].append(run_child(kind, dict(spec, log_dir=str(work / f"{side}_{repeat}")), python))
    pairs = _our_pairs(model, data)
    tokens = sum(p.num_tokens for p in pairs[:steps * args.batch])  # both sequences: 2 x prompt + responses
    results = {side: summarise(r, tokens) for side, r in runs.items()}
    report(results, args, tokens, _num_params(model), [_pair_digest(p.prompt, p.chosen, p.rejected) for p in pairs])
    if args.workdir is None:
        print(f"\ninputs and outputs: {work}")


def _num_params(model) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model).glob("*.safetensors"):
        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                total += int(__import__("numpy").prod(st.get_slice(name).get_shape()))
    return total


if __name__ == "__main__":
    main()
