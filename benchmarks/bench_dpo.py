"""Benchmark DPO training throughput and peak memory: padded pairs against packed pairs.

Synthetic preference pairs with long-tailed lengths: per pair a prompt and two responses, each
log-normal (sequence mean about --mean_length tokens: 30% prompt, 70% response; sigma --sigma),
every sequence (prompt + response) clipped to --seq_length. Both layouts run full DPO train steps
on the same pairs and the same llama-shaped GPTModel: collate -> forward -> chunked log-probs ->
DPO loss (precomputed reference log-probs, as ref_mode=precompute) -> backward -> clip -> AdamW
step, --accumulation micro-batches per step.
  padded  micro-batch = --micro_batch_size pairs: 2 x mbs rows right-padded to the longest sequence
          (pairs in a seeded random order, as training samples them)
  packed  micro-batch = --micro_batch_size packs of pack_size = 2 x seq_length tokens (whole pairs,
          best_fit_decreasing as online packing does, packs in a seeded random order)
so both have the same row-slot budget per micro-batch (2 x mbs x seq_length tokens). Each layout runs
in its own subprocess so its peak memory is its own (CPU: max resident set; CUDA: max allocated);
the layouts alternate --repeats times and each keeps its best time, so a busy machine skews the
ratio less. The table shows real (non-padding) tokens per second, slot fill and peak memory, then
the packed / padded ratio (by wall clock and by CPU time, which a busy shared machine distorts far
less). The transformer blocks cost per row slot, so packing saves what padding wasted there; the
output projection and log-softmax cost per scored response token, the same in both layouts, so a
large vocabulary relative to the blocks (head/blocks flops ~ V / (10.5 x hidden x layers)) dilutes
the gain. Real models sit near 0.1-0.4 (Llama-3.2-1B 0.37, Llama-3-8B 0.09); the defaults here
(4 x 256, V 8192) are 0.76, so compare with e.g. --layers 4 --hidden 512 --vocab 4096 (0.19).
On GPU packing also replaces many small kernels with few large ones.

    python benchmarks/bench_dpo.py --n 256 --seq_length 512 --mean_length 96 --micro_batch_size 4 --threads 2
    python benchmarks/bench_dpo.py --packed            # packed layout only, in this process
    python benchmarks/bench_dpo.py --lora              # full-parameter vs LoRA DPO (packed layout)

--lora compares, on the same model and packed pairs: full-parameter DPO (precomputed reference), LoRA
(rank --lora_rank on every projection, base frozen) with precomputed reference log-probs, and LoRA
with the adapter reference (ref_mode=adapter: one extra no-grad forward with adapters off per
micro-batch, nothing precomputed).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings
from nemo_aligner.algorithms.reference import ModelReference, precompute_reference
from nemo_aligner.config.dpo import DPOConfig
from nemo_aligner.config.sections import LoraConfig
from nemo_aligner.data.layout import DataLayout, pack_examples, pack_summary
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.tokenize import TokenizedPair
from nemo_aligner.data.report import RowReport
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.lora import apply_lora
from nemo_aligner.parallel.mesh import Parallel
from nemo_aligner.parallel.run import ParallelRun


def synthetic_pairs(n: int, seq_length: int, mean_length: float, sigma: float, vocab: int, seed: int):
    rng = np.random.default_rng(seed)

    def lognormal(mean, size):  # log-normal mean exp(mu + sigma^2 / 2) = mean
        return np.rint(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size)).astype(int)

    prompts = np.clip(lognormal(0.3 * mean_length, n), 1, seq_length - 1)
    responses = np.clip(lognormal(0.7 * mean_length, (n, 2)), 1, None)
    responses = np.minimum(responses, seq_length - prompts[:, None])
    pairs = [TokenizedPair(rng.integers(3, vocab, p, dtype=np.int32), rng.integers(3, vocab, c, dtype=np.int32),
                           rng.integers(3, vocab, r, dtype=np.int32), None, None)
             for p, (c, r) in zip(prompts, responses)]
    dataset = PreferenceDataset(pairs, RowReport(files=["synthetic"], unit="pairs", num_rows=n, num_examples=n))
    return dataset  # reference log-probs: precomputed with the initial model in train()


def llama_shaped(args) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 8 // 3,
                              num_attention_heads=8, num_query_groups=2, normalization="rmsnorm", activation="swiglu",
                              position_embedding_type="rope", vocab_size=args.vocab,
                              max_position_embeddings=args.seq_length))


def micro_batches(dataset, args, packed: bool) -> list:
    items = (pack_examples(dataset, 2 * args.seq_length, "best_fit_decreasing", args.seed) if packed
             else list(range(len(dataset))))
    order = np.random.default_rng(args.seed).permutation(len(items))
    mbs = args.micro_batch_size
    return [[items[i] for i in order[k:k + mbs]] for k in range(0, len(order), mbs)]


def train(args, packed: bool, variant: str = "full") -> dict:
    """Full DPO steps over every pair once; throughput, fill and peak memory of this process.
    variant: full | lora (precomputed reference) | lora_adapter (reference = adapters off)."""
    device = torch.device(args.device)
    dataset = synthetic_pairs(args.n, args.seq_length, args.mean_length, args.sigma, args.vocab, args.seed)
    model = llama_shaped(args).to(device)
    if variant != "full":
        apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=args.lora_rank))
    settings = DPOSettings.from_config(DPOConfig(ref_policy_kl_penalty=0.1, logprob_chunk_size=1024))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    algorithm = DPOAlgorithm(settings, pad_id=0)
    run = ParallelRun(Parallel(device=device), model, algorithm.head(), autocast=autocast)  # one process
    run.executor.algorithm = algorithm
    if variant == "lora_adapter":
        algorithm.reference = ModelReference(run.policy, frozen_copy=False)
    else:
        # The initial model's log-probs, as ref_mode=precompute computes them. The synthetic ones are far
        # from the policy's: the sigmoid saturates and backward runs on denormal floats, several times
        # slower on CPU, which would make the reference values, not LoRA or the layout, decide a comparison.
        items = micro_batches(dataset, args, packed)
        precompute_reference(run, DataLayout(dataset, [i for m in items for i in m], packed), algorithm.make_batch,
                             args.micro_batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = [algorithm.make_batch(dataset, m, packed).to(device) for m in micro_batches(dataset, args, packed)]
    steps = [batches[k:k + args.accumulation] for k in range(0, len(batches), args.accumulation)]

    def step(group):
        run.executor.forward_backward(group, sum(b.num_pairs for b in group))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(steps[0])  # warm-up: allocator, kernels, optimiser state
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        for group in steps:
            step(group)
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    real = args.epochs * sum(b.num_real_tokens for b in batches)
    slots = args.epochs * sum(b.input_ids.numel() for b in batches)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"pairs": len(dataset), "rows": sum(b.input_ids.shape[0] for b in batches), "micro_batches": len(batches),
              "steps": len(steps) * args.epochs, "seconds": seconds, "tokens_per_sec": real / seconds,
              "tokens_per_cpu_sec": real / cpu_seconds,
              "fill": real / slots, "peak_mib": peak / 2**20,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if packed:
        packs = [p for b in micro_batches(dataset, args, True) for p in b]
        result["pairs_per_pack"] = pack_summary(dataset, packs, 2 * args.seq_length)["avg_examples_per_pack"]
    return result


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_in_subprocess(layout: str, variant: str = "full") -> dict:
    argv = [a for a in sys.argv[1:] if a not in ("--packed", "--padded")]
    print(f"  running {layout} {variant} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, *argv, "--_child", layout, "--_variant", variant],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{layout} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


LORA_VARIANTS = ("full", "lora", "lora_adapter")


def compare_lora(args):
    """--lora: each variant in its own subprocess (its own peak memory), alternating, best time kept."""
    runs = {v: [] for v in LORA_VARIANTS}
    for _ in range(args.repeats):
        for variant in LORA_VARIANTS:
            runs[variant].append(run_in_subprocess("packed", variant))
    results = {v: max(r, key=lambda x: x["tokens_per_sec"]) | {"peak_mib": max(x["peak_mib"] for x in r)}
               for v, r in runs.items()}
    print(f"{args.n} pairs, seq_length {args.seq_length}, packed; model {llama_shaped(args).num_parameters():,} "
          f"params ({args.layers} layers, hidden {args.hidden}); LoRA rank {args.lora_rank} on all projections; "
          f"{args.device}, precision {args.precision}, {args.threads} thread(s)")
    labels = {"full": "full (precomputed ref)", "lora": "LoRA (precomputed ref)", "lora_adapter": "LoRA (adapter ref)"}
    print(f"\n{'variant':<24} {'trainable':>12} {'time (s)':>9} {'tokens/s':>10} {'peak MiB':>9}")
    for v, r in results.items():
        print(f"{labels[v]:<24} {r['trainable']:>12,} {r['seconds']:>9.2f} {r['tokens_per_sec']:>10,.0f} "
              f"{r['peak_mib']:>9,.0f}")
    full = results["full"]
    for v in ("lora", "lora_adapter"):
        print(f"{labels[v]} / full: tokens/s {results[v]['tokens_per_sec'] / full['tokens_per_sec']:.2f}x, "
              f"peak memory {results[v]['peak_mib'] / full['peak_mib']:.2f}x")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="preference pairs")
    parser.add_argument("--seq_length", type=int, default=512, help="max tokens per sequence; pack size = 2x this")
    parser.add_argument("--mean_length", type=float, default=96.0, help="mean sequence length (prompt + response)")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (tail weight)")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="pairs (padded) or packs (packed)")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimiser step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per layout; the best time counts")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--packed", action="store_true", help="only the packed layout, in this process")
    mode.add_argument("--padded", action="store_true", help="only the padded layout, in this process")
    parser.add_argument("--_child", choices=("padded", "packed"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help="full-parameter vs LoRA DPO (packed layout, real reference log-probs)")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank for --lora (all projections)")
    parser.add_argument("--_variant", choices=LORA_VARIANTS, default="full", help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(train(args, args._child == "packed", args._variant)))
        return
    if args.lora:
        return compare_lora(args)
    dataset = synthetic_pairs(args.n, args.seq_length, args.mean_length, args.sigma, args.vocab, args.seed)
    seq = np.array([[len(p.prompt) + len(p.chosen), len(p.prompt) + len(p.rejected)] for p in dataset.pairs]).ravel()
    print(f"{args.n} pairs, sequence lengths mean {seq.mean():.0f} median {np.median(seq):.0f} p95 "
          f"{np.percentile(seq, 95):.0f} max {seq.max()}; seq_length {args.seq_length}, pack size "
          f"{2 * args.seq_length}; model {llama_shaped(args).num_parameters():,} params (llama-shaped: {args.layers} "
          f"layers, hidden {args.hidden}, GQA 8/2, SwiGLU, RoPE); micro-batch {args.micro_batch_size} pairs or packs, "
          f"{args.accumulation} per step; {args.device}, precision {args.precision}, {args.threads} thread(s)")
    layouts = ["packed"] if args.packed else ["padded"] if args.padded else ["padded", "packed"]
    if len(layouts) == 1:
        results = {layouts[0]: train(args, layouts[0] == "packed")}
    else:
        runs = {layout: [] for layout in layouts}
        for _ in range(args.repeats):
            for layout in layouts:
                runs[layout].append(run_in_subprocess(layout))
        results = {layout: max(r, key=lambda x: x["tokens_per_sec"])
                   | {"peak_mib": max(x["peak_mib"] for x in r),
                      "tokens_per_cpu_sec": max(x["tokens_per_cpu_sec"] for x in r)}
                   for layout, r in runs.items()}
    print(f"\n{'layout':<8} {'rows':>6} {'micro-batches':>14} {'steps':>6} {'time (s)':>9} {'fill':>7} "
          f"{'tokens/s':>10} {'tokens/CPU-s':>13} {'peak MiB':>9}")
    for name, r in results.items():
        print(f"{name:<8} {r['rows']:>6} {r['micro_batches']:>14} {r['steps']:>6} {r['seconds']:>9.2f} "
              f"{100 * r['fill']:>6.1f}% {r['tokens_per_sec']:>10,.0f} {r['tokens_per_cpu_sec']:>13,.0f} "
              f"{r['peak_mib']:>9,.0f}")
    if "packed" in results:
        print(f"\npacked: {results['packed']['pairs_per_pack']:.2f} pairs per pack")
    if len(results) == 2:
        ratio = results["packed"]["tokens_per_sec"] / results["padded"]["tokens_per_sec"]
        cpu_ratio = results["packed"]["tokens_per_cpu_sec"] / results["padded"]["tokens_per_cpu_sec"]
        print(f"packed / padded real tokens/s: {ratio:.2f}x wall clock, {cpu_ratio:.2f}x per CPU second "
              "(steadier on a shared machine; on CUDA only wall clock means anything) (goal >= 1.8x)")


if __name__ == "__main__":
    main()
