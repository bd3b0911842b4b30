"""Packed SFT and DPO training steps of a ~1B Llama-shaped model on one GPU: tokens/s, model TFLOP/s,
MFU, peak memory and the time split forward / backward / optimiser / reference pass.

    python benchmarks/bench_gpu.py                         # needs CUDA; a few minutes on one H100/H200
    python benchmarks/bench_gpu.py --compile --json out.json
    python benchmarks/bench_gpu.py --dry-run               # the same code path on CPU with a tiny model

The model is built from config (Llama-3.2-1B's shape, random weights, nothing downloaded) and trained
with the project's own pieces: GPTModel, the SFT and DPO algorithms (chunked fp32 log-probs, preference
loss) run on the model ending in their heads (models.heads.ModelWithHead), a frozen reference copy for
DPO's reference pass (as ref_mode=online), build_optimizer (fused AdamW on CUDA), bf16-mixed autocast
with fp32 master weights (recipes.skeleton.autocast_for), collate_pairs / collate_sft on synthetic
token data packed by data.packing.pack. Each run also has a padded-batch twin: the same
sequences per step, one per row, right-padded.

FLOPs are model FLOPs (useful work only; activation-checkpoint recompute, the chunked log-probs'
recomputed logits and padding are not counted), per step:
  training (SFT, DPO policy):  6 * N_blocks * T  +  6 * E * V * S  +  12 * L * H * D * A
  DPO reference (forward):     2 * N_blocks * T  +  2 * E * V * S  +   4 * L * H * D * A
  N_blocks  weights of the linear layers in the transformer blocks (q, k, v, o, MLP; no embedding, norms, biases)
  T         real (non-padding) tokens;  S  scored tokens (labels != -100), the only ones projected to the vocabulary
  E, V      hidden size and vocabulary: the output projection costs 2 * E * V per scored token forward
  L, H, D   layers, query heads, head dim
  A         sum over sequences of the causal query-key pairs s * (s + 1) / 2 (the useful half of s^2;
            with a sliding window W < s: W * s - W * (W - 1) / 2): QK^T and PV are 2 * D flops per pair
            per head each, and backward is twice forward.
MFU = model TFLOP/s / the GPU's dense bf16 peak (PEAK_BF16_TFLOPS, or --peak-tflops).
Timing: CUDA events around each phase (device time), wall clock with a synchronize for tokens/s;
warm-up steps first, then the mean over the timed steps. Peak memory: torch.cuda.max_memory_allocated
over the timed steps of each run.
"""

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings, reference_pair_sums  # noqa: E402
from nemo_aligner.algorithms.sft import SFTAlgorithm, SFTSettings  # noqa: E402
from nemo_aligner.config.dpo import DPOConfig  # noqa: E402
from nemo_aligner.data.packing import pack  # noqa: E402
from nemo_aligner.data.preference.collate import collate_pairs  # noqa: E402
from nemo_aligner.data.preference.dataset import PreferenceDataset  # noqa: E402
from nemo_aligner.data.preference.tokenize import TokenizedPair  # noqa: E402
from nemo_aligner.data.report import RowReport  # noqa: E402
from nemo_aligner.data.sft.collate import collate_sft  # noqa: E402
from nemo_aligner.data.sft.dataset import SFTDataset  # noqa: E402
from nemo_aligner.data.sft.tokenize import TokenizedSFT  # noqa: E402
from nemo_aligner.models.compile import compile_blocks  # noqa: E402
from nemo_aligner.models.gpt import GPTConfig, GPTModel  # noqa: E402
from nemo_aligner.models.heads import ModelWithHead  # noqa: E402
from nemo_aligner.models.layers.attention import build_attention_context  # noqa: E402
from nemo_aligner.recipes.skeleton import autocast_for  # noqa: E402
from nemo_aligner.training.optim import build_optimizer  # noqa: E402

NO_CUDA = ("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False). "
           "Run `python benchmarks/bench_gpu.py --dry-run` to check the same code path on CPU with a tiny model.")

MODELS = {
    # Llama-3.2-1B's shape (tied embeddings): 1.24e9 parameters
    "llama-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                     num_query_groups=8, vocab_size=128256, rotary_base=500000.0, max_position_embeddings=131072,
                     share_embeddings_and_output_weights=True),
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                 vocab_size=512, max_position_embeddings=8192, share_embeddings_and_output_weights=True),
}

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets; matched in this order
# against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS = [("GH200", 989.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0)]
CHUNK_SIZE = 1024
PAD_ID = 0


# ------------------------------------------------------------------------------------------- FLOPs
def causal_pairs(length: int, window: int | None = None) -> int:
    """Query-key pairs causal attention scores for one sequence (sliding window W: at most W keys per query)."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * length - window * (window - 1) // 2


def block_linear_weights(model: GPTModel) -> int:
    """N_blocks: weights of the transformer blocks' linear layers (2 flops each per token forward)."""
    return sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear))


@dataclass
class Work:
    """What one micro-batch asks of the model, for the FLOP count."""

    tokens: int  # real tokens (T)
    scored: int  # scored tokens (S)
    attn_pairs: int  # sum of causal query-key pairs over the sequences (A)
    row_tokens: int  # tokens the model actually processes, padding included (R * T_row)


def model_flops(cfg: GPTConfig, n_blocks: int, work: Work, train: bool) -> float:
    """Model FLOPs of one pass over `work`: forward only, or forward + backward (3x) when train."""
    forward = (2 * n_blocks * work.tokens + 2 * cfg.hidden_size * cfg.vocab_size * work.scored
               + 4 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * work.attn_pairs)
    return 3 * forward if train else forward


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ------------------------------------------------------------------------------------------- data
def sft_data(rng, pack_size: int, num_packs: int, vocab: int):
    """Synthetic SFT examples (prompt unlabelled, response labelled), packed: (dataset, fullest packs)."""
    n = int(2.0 * num_packs * pack_size / (pack_size * 9 / 32)) + 8  # mean length 9/32 of a pack
    lengths = rng.integers(pack_size // 16, pack_size // 2 + 1, n)
    examples = []
    for length in lengths:
        mask = np.zeros(length, dtype=bool)
        mask[rng.integers(1, max(2, length // 2)):] = True
        examples.append(TokenizedSFT(rng.integers(1, vocab, length).astype(np.int32), mask))
    dataset = SFTDataset(examples, RowReport(files=[]))
    return dataset, _fullest(pack(lengths, pack_size, "best_fit_decreasing"), lengths, num_packs)


def dpo_data(rng, pack_size: int, num_packs: int, vocab: int):
    """Synthetic preference pairs (prompt, chosen, rejected each 1/32..1/8 of a pack), packed whole."""
    lo, hi = pack_size // 32, pack_size // 8 + 1
    n = int(2.0 * num_packs * pack_size / (4 * (lo + hi) / 2)) + 8
    ids = lambda: rng.integers(1, vocab, rng.integers(lo, hi)).astype(np.int32)  # noqa: E731
    pairs = [TokenizedPair(ids(), ids(), ids(), None, None) for _ in range(n)]
    dataset = PreferenceDataset(pairs, RowReport(files=[], unit="pairs"))
    lengths = dataset.pack_lengths()
    return dataset, _fullest(pack(lengths, pack_size, "best_fit_decreasing"), lengths, num_packs)


def _fullest(packs, lengths, k):
    return sorted(packs, key=lambda p: -sum(int(lengths[i]) for i in p))[:k]


def sft_work(dataset, items, batch) -> Work:
    lengths = [len(dataset.examples[i]) for i in items]
    return Work(batch.num_real_tokens, int((batch.labels != -100).sum()), sum(map(causal_pairs, lengths)),
                batch.input_ids.numel())


def dpo_work(dataset, items, batch) -> Work:
    lengths = [len(p.prompt) + len(r) for p in (dataset.pairs[i] for i in items) for r in (p.chosen, p.rejected)]
    return Work(batch.num_real_tokens, int((batch.labels != -100).sum()), sum(map(causal_pairs, lengths)),
                batch.input_ids.numel())


# ------------------------------------------------------------------------------------------- timing
class PhaseTimer:
    """Marks between phases: CUDA events on the current stream (device time), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:])]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RunResult:
    name: str
    tokens_per_step: float = 0.0
    fill: float = 0.0  # real tokens / tokens processed (padding waste)
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    peak_gib: float | None = None
    phases_ms: dict = field(default_factory=dict)  # reference, forward, backward, optimizer, other
    error: str | None = None


# ------------------------------------------------------------------------------------------- bench
class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.autocast = autocast_for("bf16-mixed", device)
        torch.manual_seed(0)
        with device:  # initialise on the device: a 1B model's init on the host takes long
            self.model = GPTModel(GPTConfig(**MODELS[args.model]))
        self.model.config.activations_checkpointing = args.activation_checkpointing
        reference = copy.deepcopy(self.model).requires_grad_(False).eval()  # frozen copy made before any step
        if args.compile:
            compile_blocks(self.model, backend=args.compile_backend)
            compile_blocks(reference, backend=args.compile_backend)
        self.optimizer = build_optimizer(self.model, lr=1e-6, weight_decay=0.1, betas=(0.9, 0.98))
        self.n_blocks = block_linear_weights(self.model)
        self.peak = peak_tflops(device, args.peak_tflops)
        self.sft = SFTAlgorithm(SFTSettings("tokens", CHUNK_SIZE), PAD_ID)
        settings = DPOSettings.from_config(DPOConfig(ref_policy_kl_penalty=0.1, logprob_chunk_size=CHUNK_SIZE))
        self.dpo = DPOAlgorithm(settings, PAD_ID)
        # what the executors run: the model ending in each algorithm's head
        self.modules = {"sft": ModelWithHead(self.model, self.sft.head()), "dpo": ModelWithHead(self.model, self.dpo.head()),
                        "reference": ModelWithHead(reference, self.dpo.head())}

    def attention_path(self) -> str:
        segs = torch.zeros(1, 8, dtype=torch.long, device=self.device)
        with self.autocast:
            ctx = build_attention_context(segs, 8, None, self.device, torch.float32, use_varlen=self.model.use_varlen)
        return "varlen (flash, cu_seqlens)" if ctx.cu_seqlens_N1 is not None else "SDPA + block-diagonal mask"

    def run(self, name: str, algo: str, batches_and_work) -> RunResult:
        result = RunResult(name)
        try:
            self._run(result, algo, batches_and_work)
        except torch.cuda.OutOfMemoryError as err:
            result.error = "OOM"
            print(f"{name}: out of memory ({str(err).splitlines()[0]})", file=sys.stderr)
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return result

    def _run(self, result, algo, batches_and_work):
        args, device = self.args, self.device
        phases = np.zeros(4)
        tokens = flops = 0.0
        row_tokens = 0
        start = None
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
            batch, work = batches_and_work[i % len(batches_and_work)]
            ms = self._step(algo, batch.to(device))
            if i >= args.warmup:
                phases += ms
                tokens += work.tokens
                row_tokens += work.row_tokens
                flops += model_flops(self.model.config, self.n_blocks, work, train=True)
                if algo == "dpo":
                    flops += model_flops(self.model.config, self.n_blocks, work, train=False)
        synchronize(device)
        wall = time.perf_counter() - start
        result.tokens_per_step = tokens / args.steps
        result.fill = tokens / row_tokens
        result.step_ms = 1e3 * wall / args.steps
        result.tokens_per_s = tokens / wall
        result.tflops = flops / wall / 1e12
        result.mfu = result.tflops / self.peak if self.peak else None
        if device.type == "cuda":
            result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        per_step = phases / args.steps
        result.phases_ms = dict(zip(("reference", "forward", "backward", "optimizer"), per_step.round(2).tolist()))
        result.phases_ms["other"] = round(result.step_ms - float(per_step.sum()), 2)  # host gaps, input copies

    def _step(self, algo: str, batch) -> np.ndarray:
        timer = PhaseTimer(self.device)
        timer.mark()
        if algo == "dpo":  # the reference pass of online mode, as DPOAlgorithm.prepare runs it
            with torch.no_grad(), self.autocast:
                ref = reference_pair_sums(batch, _run(self.modules["reference"], batch))
            batch.ref_chosen, batch.ref_rejected = ref[:, 0], ref[:, 1]
            timer.mark()
            with self.autocast:
                outputs = _run(self.modules["dpo"], batch)
            loss, _ = self.dpo.loss(batch, outputs, batch.num_pairs)
        else:
            timer.mark()
            with self.autocast:
                outputs = _run(self.modules["sft"], batch)
            loss, _ = self.sft.loss(batch, outputs, self.sft.num_units(batch))
        timer.mark()
        loss.backward()
        timer.mark()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark()
        return np.array(timer.durations_ms())


def _run(module, batch):
    return module(batch.input_ids, labels=batch.labels, segment_ids=batch.segment_ids)


def build_runs(args, vocab: int):
    """(name, algorithm, [(batch, work)]) for every run: packed at each pack size, padded twin at the first."""
    rng = np.random.default_rng(0)
    num_batches = min(args.steps + args.warmup, 8)  # distinct micro-batches, cycled
    runs = []
    for algo, make, collate, work in (("sft", sft_data, collate_sft, sft_work), ("dpo", dpo_data, collate_pairs, dpo_work)):
        for k, pack_size in enumerate(args.pack_sizes):
            dataset, packs = make(rng, pack_size, num_batches, vocab)
            packed = [collate(dataset, [p], PAD_ID, True) for p in packs]
            runs.append((f"{algo} packed {pack_size}", algo, [(b, work(dataset, p, b)) for b, p in zip(packed, packs)]))
            if k == 0 and not args.no_padded:
                padded = [collate(dataset, p, PAD_ID, False) for p in packs]
                runs.append((f"{algo} padded (same seqs)", algo,
                             [(b, work(dataset, p, b)) for b, p in zip(padded, packs)]))
    return runs


# ------------------------------------------------------------------------------------------- report
def format_table(results: list[RunResult]) -> str:
    head = (f"{'run':<24}{'tok/step':>9}{'fill':>6}{'step ms':>9}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
            f"{'peak GiB':>9}{'ref':>8}{'fwd':>8}{'bwd':>8}{'optim':>8}{'other':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<24}{r.error:>9}")
            continue
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "n/a"
        p = r.phases_ms
        lines.append(f"{r.name:<24}{r.tokens_per_step:>9.0f}{r.fill:>6.2f}{r.step_ms:>9.1f}{r.tokens_per_s:>10.0f}"
                     f"{r.tflops:>9.3g}{mfu:>7}{peak:>9}{p['reference']:>8.1f}{p['forward']:>8.1f}"
                     f"{p['backward']:>8.1f}{p['optimizer']:>8.1f}{p['other']:>7.1f}")
    return "\n".join(lines)


FORMULA = ("model FLOPs per step = 6*N_blocks*T + 6*E*V*S + 12*L*H*D*A (training) "
           "[+ 2*N_blocks*T + 2*E*V*S + 4*L*H*D*A for DPO's reference forward]; T real tokens, S scored tokens, "
           "A = sum over sequences of causal pairs s(s+1)/2 (the useful half); no recompute or padding counted")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, small packs: checks the code path")
    p.add_argument("--model", choices=sorted(MODELS), help="default: llama-1b (tiny with --dry-run)")
    p.add_argument("--pack-sizes", type=int, nargs="+", help="default: 4096 8192 (64 128 with --dry-run)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 10; 2 with --dry-run)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --dry-run)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--no-padded", action="store_true", help="skip the padded-batch comparison runs")
    p.add_argument("--peak-tflops", type=float, help="override the GPU's dense bf16 peak used for MFU")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.model = args.model or ("tiny" if dry else "llama-1b")
    args.pack_sizes = args.pack_sizes or ([64, 128] if dry else [4096, 8192])
    args.steps = args.steps or (2 if dry else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    return args


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(NO_CUDA)
    device = torch.device("cuda", torch.cuda.current_device()) if not args.dry_run else torch.device("cpu")
    bench = Bench(args, device)
    cfg = bench.model.config
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: timings say nothing)"
    print(f"device: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"model: {args.model}, {bench.model.num_parameters() / 1e9:.3g}e9 parameters (N_blocks "
          f"{bench.n_blocks / 1e9:.3g}e9), {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_query_groups} kv, ffn {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}")
    print(f"precision: bf16-mixed (fp32 master weights); attention: {bench.attention_path()}; "
          f"AdamW fused: {bool(bench.optimizer.defaults['fused'])}; compile: {args.compile}; "
          f"activation checkpointing: {args.activation_checkpointing}; log-prob chunk {CHUNK_SIZE}; "
          f"peak bf16 {bench.peak or 'unknown'} TFLOP/s")
    print(f"steps: {args.warmup} warm-up + {args.steps} timed per run, micro-batch = 1 pack (padded: same sequences)")
    results = [bench.run(name, algo, batches) for name, algo, batches in build_runs(args, cfg.vocab_size)]
    print(format_table(results))
    print(FORMULA)
    print("phases (ms/step): ref = DPO reference forward (no grad), fwd = policy forward + chunked log-probs + loss, "
          "bwd = backward, optim = clip + AdamW step + zero_grad, other = wall minus phases")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "args": vars(args), "formula": FORMULA,
                                               "results": [asdict(r) for r in results]}, indent=2))
    return results


if __name__ == "__main__":
    main()
