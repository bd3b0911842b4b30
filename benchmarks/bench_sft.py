"""Benchmark SFT training throughput: online-packed rows against padded rows on long-tailed data.

Synthetic examples with log-normal lengths (mean about --mean_length tokens, sigma --sigma, clipped
to [16, --seq_length]); the first quarter of each is prompt (no labels), the rest response. Both
layouts run the real SFT path (collate -> GPTModel -> chunked log-probs -> loss -> backward -> AdamW
step) with the same micro-batch shape budget: --micro_batch_size rows of at most --seq_length tokens.
Padded rows hold one example each, right-padded to the longest in the micro-batch (examples in a
seeded random order, as in training); packed rows hold whole examples packed best-fit into
pack_size = seq_length. Each layout trains its own model on the same examples for --epochs passes;
the two runs are interleaved micro-batch by micro-batch (whichever is less far along goes next), so
both see the same machine load. The table shows real (non-padding) tokens per second of training
time, the fill of the row slots, and the packed / padded ratio.

    python benchmarks/bench_sft.py --n 256 --seq_length 1024 --mean_length 160 --threads 2
"""

import argparse
import time

import numpy as np
import torch

from nemo_aligner.algorithms.sft import SFTAlgorithm, SFTSettings
from nemo_aligner.data.layout import pack_examples
from nemo_aligner.data.report import RowReport
from nemo_aligner.data.sft.dataset import SFTDataset
from nemo_aligner.data.sft.tokenize import TokenizedSFT
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.heads import ModelWithHead


def synthetic_dataset(n: int, seq_length: int, mean_length: float, sigma: float, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    mu = np.log(mean_length) - sigma**2 / 2  # log-normal mean exp(mu + sigma^2 / 2) = mean_length
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, n)), 16, seq_length).astype(int)
    examples = []
    for length in lengths:
        mask = np.zeros(length, dtype=bool)
        mask[length // 4:] = True
        examples.append(TokenizedSFT(rng.integers(3, vocab, length).astype(np.int32), mask))
    return SFTDataset(examples, RowReport(files=["synthetic"], num_examples=n))


def llama_shaped(vocab: int, seq_length: int, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                              num_query_groups=2, normalization="rmsnorm", activation="swiglu",
                              position_embedding_type="rope", vocab_size=vocab, max_position_embeddings=seq_length))


class Run:
    """One layout's model, optimiser and micro-batches, timed one micro-batch at a time."""

    def __init__(self, dataset, items, packed: bool, args):
        self.model = llama_shaped(args.vocab, args.seq_length)
        self.algorithm = SFTAlgorithm(SFTSettings("tokens", chunk_size=1024), pad_id=0)
        self.module = ModelWithHead(self.model, self.algorithm.head())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        order = np.random.default_rng(args.seed).permutation(len(items))
        micro = [[items[i] for i in order[k:k + args.micro_batch_size]]
                 for k in range(0, len(order), args.micro_batch_size)]
        self.batches = [self.algorithm.make_batch(dataset, m, packed) for m in micro] * args.epochs
        self.done, self.seconds, self.real, self.slots = 0, 0.0, 0, 0

    def step(self, timed: bool = True):
        batch = self.batches[self.done % len(self.batches)]
        start = time.perf_counter()
        outputs = self.module(batch.input_ids, labels=batch.labels, segment_ids=batch.segment_ids)
        loss, _ = self.algorithm.loss(batch, outputs, self.algorithm.num_units(batch))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.seconds += time.perf_counter() - start
            self.done += 1
            self.real += batch.num_real_tokens
            self.slots += batch.input_ids.numel()

    @property
    def progress(self) -> float:
        return self.done / len(self.batches)


def run_interleaved(runs: dict) -> None:
    """Step whichever layout is least far through its epochs, so both see the same machine load."""
    for run in runs.values():
        run.step(timed=False)  # warm-up: allocator, kernels
    while any(r.progress < 1 for r in runs.values()):
        min(runs.values(), key=lambda r: r.progress).step()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="examples")
    parser.add_argument("--seq_length", type=int, default=1024, help="max example length = pack size")
    parser.add_argument("--mean_length", type=float, default=160.0, help="log-normal mean length before clipping")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (tail weight)")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="rows per micro-batch, both layouts")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = synthetic_dataset(args.n, args.seq_length, args.mean_length, args.sigma, args.vocab, args.seed)
    lengths = dataset.pack_lengths()
    print(f"{args.n} examples, lengths mean {lengths.mean():.0f} median {np.median(lengths):.0f} "
          f"p95 {np.percentile(lengths, 95):.0f} max {lengths.max()}; seq_length {args.seq_length}; "
          f"model {llama_shaped(args.vocab, args.seq_length).num_parameters():,} params (llama-shaped: 4 layers, "
          f"hidden 256, GQA 8/2, SwiGLU, RoPE); micro-batch {args.micro_batch_size} rows; "
          f"{args.threads} thread(s)")
    packs = pack_examples(dataset, args.seq_length, "best_fit_decreasing", seed=0)
    runs = {"padded": Run(dataset, list(range(len(dataset))), False, args), "packed": Run(dataset, packs, True, args)}
    run_interleaved(runs)
    print(f"\n{'layout':<8} {'rows':>6} {'micro-batches':>14} {'time (s)':>9} {'fill':>7} {'tokens/s':>10}")
    for name, r in runs.items():
        print(f"{name:<8} {sum(b.input_ids.shape[0] for b in r.batches):>6} {r.done:>14} {r.seconds:>9.2f} "
              f"{100 * r.real / r.slots:>6.1f}% {r.real / r.seconds:>10,.0f}")
    ratio = (runs["packed"].real / runs["packed"].seconds) / (runs["padded"].real / runs["padded"].seconds)
    print(f"\npacked / padded tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
