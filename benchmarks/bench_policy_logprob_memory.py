"""Peak memory of the GRPO/PPO log-prob + entropy step (`losses.policy.token_logprobs_and_entropy`,
temperature-scaled, forward + backward), measured on CPU like bench_logprob_memory.py: chunked, the
extra memory is a fixed number of chunks of logits whatever the token count; unchunked it is that many
copies of the whole [tokens, vocab] logits.

    python benchmarks/bench_policy_logprob_memory.py
    python benchmarks/bench_policy_logprob_memory.py --tokens 4096 --vocab 32768 --chunk 512
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_logprob_memory import peak_allocated_bytes  # noqa: E402

from nemo_aligner.losses.policy import token_logprobs_and_entropy  # noqa: E402


def logprob_entropy_step_peak(num_tokens: int, hidden: int, vocab: int, chunk_size: int, temperature: float = 0.7,
                              entropy_grad: bool = True) -> dict:
    """Peak memory of (log-probs + entropy).sum().backward(), in bytes and in chunks of fp32 logits
    (entropy_grad=False: the entropy is a detached metric, as GRPO logs it)."""
    gen = torch.Generator().manual_seed(0)
    hidden_NE = (0.1 * torch.randn(num_tokens, hidden, generator=gen)).requires_grad_()
    weight_VE = (0.1 * torch.randn(vocab, hidden, generator=gen)).requires_grad_()
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen)

    def step():
        logps_N, entropy_N = token_logprobs_and_entropy(hidden_NE, weight_VE, targets_N, temperature, chunk_size,
                                                        entropy_grad=entropy_grad)
        (logps_N.sum() + entropy_N.sum()).backward()

    peak = peak_allocated_bytes(step)
    grads = 4 * (vocab + num_tokens) * hidden  # the weight's and the hidden states' gradients: unavoidable
    chunk_logits = 4 * min(chunk_size, num_tokens) * vocab
    return {"tokens": num_tokens, "vocab": vocab, "chunk": chunk_size, "peak": peak, "activations": peak - grads,
            "chunk_logits": chunk_logits, "chunks": (peak - grads) / chunk_logits, "full_logits": 4 * num_tokens * vocab}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=512)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"log-probs + entropy step (forward + backward), E={args.hidden}, V={args.vocab}, fp32; "
          "MiB allocated beyond the gradients (torch.profiler, CPU)")
    print(f"{'tokens':>7}{'chunk':>7}{'entropy':>9}{'activ. MiB':>12}{'chunks of logits':>18}{'full logits MiB':>17}")
    rows = []
    for tokens in args.tokens:
        for chunk in (args.chunk, tokens):
            for entropy_grad in (True, False):
                r = logprob_entropy_step_peak(tokens, args.hidden, args.vocab, chunk, entropy_grad=entropy_grad)
                rows.append(r)
                label = "all" if chunk == tokens else str(chunk)
                print(f"{tokens:>7}{label:>7}{'grad' if entropy_grad else 'metric':>9}{r['activations'] / 2**20:>12.1f}"
                      f"{r['chunks']:>18.2f}{r['full_logits'] / 2**20:>17.1f}")
    return rows


if __name__ == "__main__":
    main()
