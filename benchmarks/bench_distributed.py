"""Memory per rank and step time of distributed DPO on CPU (gloo): one process vs tp2 vs pp2 (vs dp2).

For each layout, every rank builds the same model, applies the layout (pipeline split -> tensor
parallel -> FSDP2), and trains a few DPO steps on the demo data with precomputed reference
log-probs. Reported per rank: bytes of parameters, gradients and AdamW state this rank holds (local
shards; what falls with the parallel size), and peak resident memory (ru_maxrss: the interpreter,
torch, activations and the full model every rank builds before sharding it). Step time is the median
over the timed steps; the ratio is against the single-process run of the same model and data.

    python benchmarks/bench_distributed.py                       # defaults below
    python benchmarks/bench_distributed.py --layouts tp1 tp2 pp2 dp2 --hidden 512 --layers 8
"""

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2), "dp2": (2, 1, 1), "tp2_pp2": (4, 2, 2)}


def overrides(args, world, tp, pp, data_dir):
    return [
        f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={args.hidden * 4}", f"model.num_layers={args.layers}",
        f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.heads // 2}",
        f"model.vocab_size={args.vocab}", f"model.micro_batch_size={args.micro}", f"model.global_batch_size={args.batch}",
        f"trainer.devices={world}", f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}",
        f"model.data.data_prefix.train=[{data_dir / 'train.jsonl'}]", "exp_manager.create_checkpoint_callback=false",
        f"model.data.data_prefix.validation=[{data_dir / 'train.jsonl'}]", "exp_manager.progress_bar=false",
    ]


def state_bytes(params, optimizer) -> dict:
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    out = {"params": sum(local(p) for p in params), "grads": sum(local(p.grad) for p in params if p.grad is not None)}
    out["optimizer"] = sum(local(v) for s in optimizer.state.values() for v in s.values()
                           if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


def worker(rank, world, tp, pp, args, data_dir, port, out_file):
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings
    from nemo_aligner.recipes.dpo import load_layouts, setup_reference
    from nemo_aligner.recipes.skeleton import build_policy, build_run, start_run
    from nemo_aligner.training.loop import Trainer, TrainingPlan
    from nemo_aligner.training.optim import build_optimizer, build_scheduler
    from tests.helpers import dpo_config

    cfg = dpo_config(Path(data_dir) / f"run_{world}_{tp}_{pp}", *overrides(args, world, tp, pp, Path(data_dir)),
                     f"model.dpo.ref_cache_dir={Path(data_dir) / 'cache'}")
    start = start_run(cfg)  # the launch, its layout, tokenizer: as every recipe starts
    train, *_ = load_layouts(cfg, start.tokenizer)
    rss_before_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_policy(start)
    algorithm = DPOAlgorithm(DPOSettings.from_config(cfg.model.dpo), start.tokenizer.pad_id)
    run = build_run(start, model, algorithm, (train,))
    setup_reference(cfg, start, run, algorithm, None, {"train": train})  # precomputed, as the recipe's default
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.98))
    plan = TrainingPlan.from_config(cfg.trainer.dpo, num_items=len(train.items),
                                    global_batch_size=cfg.model.global_batch_size,
                                    micro_batch_size=cfg.model.micro_batch_size, dp_size=run.dp.size, seed=0,
                                    shuffle=True)
    scheduler = build_scheduler(optimizer, name="constant", max_steps=100, warmup_steps=0, constant_steps=0,
                                min_lr=0.0)
    trainer = Trainer(model=model, algorithm=algorithm, optimizer=optimizer, scheduler=scheduler, run=run,
                      train_data=train, val_data=None, loop=cfg.trainer.dpo, plan=plan, logger=None)
    times = []
    for step in range(args.warmup + args.steps):
        items = [train.items[i] for i in trainer.sampler.global_batch(*divmod(step, trainer.sampler.steps_per_epoch))]
        t0 = time.perf_counter()
        trainer.train_step(items)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    result = {"rank": rank, "step_time": statistics.median(times), **state_bytes(list(model.parameters()), optimizer),
              "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_model": rss_before_model}
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(result, f)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(name, args, data_dir) -> list[dict]:
    world, tp, pp = LAYOUTS[name]
    out_file = Path(data_dir) / f"result_{name}"
    mp.spawn(worker, args=(world, tp, pp, args, str(data_dir), free_port(), str(out_file)), nprocs=world)
    return [json.loads(Path(f"{out_file}.{r}").read_text()) for r in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["tp1", "tp2", "pp2"], choices=sorted(LAYOUTS))
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8, help="global batch (pairs)")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32, help="demo pairs to train on")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        demo = ROOT / "nemo_aligner/demo/data/dpo_train.jsonl"
        (data_dir / "train.jsonl").write_text("".join(demo.read_text().splitlines(keepends=True)[:args.pairs]))
        results = {name: run_layout(name, args, data_dir) for name in args.layouts}
    base = results.get("tp1")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; global batch {args.batch} pairs, "
          f"micro {args.micro}; {args.threads} thread(s) per rank; {os.cpu_count()} CPU cores")
    print(f"{'layout':8} {'rank':>4} {'params':>9} {'grads':>9} {'optim':>9} {'p+g+o':>9} {'max RSS':>9} "
          f"{'RSS model':>9} {'step s':>8} {'vs 1 proc':>9}")
    for name, ranks in results.items():
        step = max(r["step_time"] for r in ranks)
        for r in ranks:
            total = r["params"] + r["grads"] + r["optimizer"]
            ratio = f"{step / base[0]['step_time']:.2f}x" if base else "-"
            print(f"{name:8} {r['rank']:>4} {r['params'] / mib:8.1f}M {r['grads'] / mib:8.1f}M "
                  f"{r['optimizer'] / mib:8.1f}M {total / mib:8.1f}M {r['max_rss'] / mib:8.0f}M "
                  f"{(r['max_rss'] - r['rss_before_model']) / mib:8.0f}M {r['step_time']:8.3f} "
                  f"{ratio:>9}")
    print("(M = MiB; RSS model = peak RSS growth from just before the model is built: the full model every rank\n"
          " builds before sharding, the sharded training state and activations; step s = median step time of\n"
          " that rank; the ratio uses the slowest rank)")


if __name__ == "__main__":
    main()
