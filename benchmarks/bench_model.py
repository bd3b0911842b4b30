"""Forward+backward throughput and peak memory of GPTModel vs the `transformers` model of the same config.

Each model runs in its own subprocess so peak resident memory (ru_maxrss) is not shared between them.
    python benchmarks/bench_model.py --hidden 512 --layers 8 --seq 512 --batch 4
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def hf_config(args):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=args.seq, tie_word_embeddings=False)


def build(which, args):
    import transformers

    from nemo_aligner.models.hf.llama import LlamaFamily

    cfg = hf_config(args)
    torch.manual_seed(0)
    if which == "transformers":
        model = transformers.LlamaForCausalLM(cfg)
        return model, lambda ids: model(ids).logits
    from nemo_aligner.models.gpt import GPTModel

    model = GPTModel(LlamaFamily().config_from_hf(cfg.to_dict(), "bench"))
    return model, model.logits


def run_one(which, args) -> dict:
    torch.set_num_threads(args.threads)
    model, logits_fn = build(which, args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(logits_fn(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_time = sorted(times)[len(times) // 2]
    return {"tokens_per_s": args.batch * args.seq / step_time, "step_s": step_time,
            "peak_mib": peak_rss / 1024, "step_peak_mib": (peak_rss - base_rss) / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per model (best is kept)")
    p.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args)))
        return
    results = {}
    for _ in range(args.rounds):  # alternate the two so background load hits both alike; keep each one's best
        for which in ("ours", "transformers"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", which],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if which not in results or r["tokens_per_s"] > results[which]["tokens_per_s"]:
                results[which] = r
    print(f"config: hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} vocab={args.vocab} "
          f"batch={args.batch}x{args.seq} threads={args.threads} (fp32, CPU, forward+backward, median of {args.steps} "
          f"steps, best of {args.rounds} alternating runs)")
    print(f"{'model':<14}{'tokens/s':>12}{'step s':>10}{'peak MiB':>11}{'step MiB':>11}")
    for which, r in results.items():
        print(f"{which:<14}{r['tokens_per_s']:>12.0f}{r['step_s']:>10.3f}{r['peak_mib']:>11.0f}{r['step_peak_mib']:>11.0f}")
    ours, ref = results["ours"], results["transformers"]
    print(f"speed ratio ours/transformers: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x (goal >= 1.0x); "
          f"step-memory ratio: {ours['step_peak_mib'] / max(ref['step_peak_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
