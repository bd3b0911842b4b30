"""Peak memory of the log-prob step (forward + backward of the chunked output projection) against
vocabulary size and token count, measured on CPU: chunking keeps the extra memory at a few chunks of
logits, where the unchunked step holds a few copies of the whole [tokens, vocab] logits.

    python benchmarks/bench_logprob_memory.py
    python benchmarks/bench_logprob_memory.py --tokens 4096 --hidden 256 --vocabs 8192 32768 131072 --autocast

How it measures: `torch.profiler` with profile_memory=True reports, with every CPU allocation and free,
the bytes allocated since profiling began and still live ("Total Allocated"); the maximum over the
step is its peak. Inputs (hidden states, output weight) exist before profiling starts; the weight's
and the hidden states' gradients (V*E and N*E floats) are allocated during it and cannot be avoided,
so "activations" below is the peak minus those two, i.e. what the log-prob computation itself adds.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemo_aligner.losses.logprobs import token_logprobs  # noqa: E402


def peak_allocated_bytes(fn) -> int:
    """Peak bytes allocated on the CPU by `fn` (and still live at the peak), from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = [e["args"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]  # 0 = CPU
    if not memory:
        return 0
    # The reporter's running total survives between profiling sessions (a tensor allocated during an
    # earlier session and freed after it is never subtracted), so measure from this session's start.
    baseline = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - baseline


def logprob_step_peak(num_tokens: int, hidden: int, vocab: int, chunk_size: int, autocast: bool = False) -> dict:
    """Peak memory of token_logprobs(...).sum().backward() with fp32 inputs (bf16 matmuls under autocast)."""
    gen = torch.Generator().manual_seed(0)
    hidden_NE = (0.1 * torch.randn(num_tokens, hidden, generator=gen)).requires_grad_()
    weight_VE = (0.1 * torch.randn(vocab, hidden, generator=gen)).requires_grad_()
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps = token_logprobs(hidden_NE, weight_VE, targets_N, chunk_size)
        logps.sum().backward()

    peak = peak_allocated_bytes(step)
    grads = 4 * (vocab + num_tokens) * hidden
    return {"tokens": num_tokens, "vocab": vocab, "chunk": chunk_size, "peak": peak, "grads": grads,
            "activations": peak - grads, "chunk_logits": 4 * min(chunk_size, num_tokens) * vocab,
            "full_logits": 4 * num_tokens * vocab}


def _mib(n):
    return f"{n / 2**20:9.1f}"


def _row(r, unchunked: bool) -> str:
    label = "all" if unchunked else str(r["chunk"])
    return (f"{r['tokens']:>7}{r['vocab']:>8}{label:>7}{_mib(r['peak'])} {_mib(r['grads'])} {_mib(r['activations'])} "
            f"{_mib(r['chunk_logits'])}{r['activations'] / r['chunk_logits']:>13.2f}{_mib(r['full_logits'])}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="scored tokens N (a full 8192-token pack)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[2048, 4096, 8192],
                   help="token counts for the second table (chunked, at the middle vocabulary)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--max-unchunked-mib", type=float, default=1024, help="skip unchunked runs whose logits exceed this")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast (logits chunk in bf16, log-softmax in fp32)")
    args = p.parse_args(argv)
    head = (f"{'tokens':>7}{'vocab':>8}{'chunk':>7}{'peak':>10}{'grads':>10}{'activ.':>10}{'1 chunk':>10}"
            f"{'activ./chunk':>13}{'full logits':>12}")
    print(f"log-prob step (forward + backward), E={args.hidden}, {'bf16 autocast' if args.autocast else 'fp32'}; "
          "MiB allocated during the step (torch.profiler, CPU)")
    print(f"-- vocabulary sweep at N={args.tokens}: chunk {args.chunk} vs unchunked\n{head}")
    rows = []
    for vocab in args.vocabs:
        for chunk in (args.chunk, args.tokens):
            unchunked = chunk == args.tokens
            if unchunked and 4 * args.tokens * vocab / 2**20 > args.max_unchunked_mib:
                print(f"{args.tokens:>7}{vocab:>8}{'all':>7}   (unchunked skipped: its logits alone are "
                      f"{4 * args.tokens * vocab / 2**20:.0f} MiB)")
                continue
            rows.append(logprob_step_peak(args.tokens, args.hidden, vocab, chunk, args.autocast))
            print(_row(rows[-1], unchunked))
    vocab = args.vocabs[len(args.vocabs) // 2]
    print(f"-- token sweep at vocab {vocab}, chunk {args.chunk}\n{head}")
    for tokens in args.sweep_tokens:
        rows.append(logprob_step_peak(tokens, args.hidden, vocab, args.chunk, args.autocast))
        print(_row(rows[-1], False))
    print("activ. = peak - gradients of the weight and hidden states (unavoidable). Chunked, it is a fixed multiple "
          "of one chunk's fp32 logits (chunk x vocab x 4 bytes) whatever N; unchunked, of the full [N, vocab] logits.")
    return rows


if __name__ == "__main__":
    main()
