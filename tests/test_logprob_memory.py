"""The chunked log-prob step's memory, measured on CPU (benchmarks/bench_logprob_memory.py): beyond the
unavoidable gradients it holds a few chunks of logits, whatever the number of tokens; unchunked, it
holds a few copies of the whole [tokens, vocab] logits."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_logprob_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_logprob_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("vocab", [4096, 8192])
def test_chunked_peak_is_a_few_chunks_and_does_not_grow_with_tokens(bench, vocab):
    small = bench.logprob_step_peak(num_tokens=512, hidden=32, vocab=vocab, chunk_size=128)
    large = bench.logprob_step_peak(num_tokens=2048, hidden=32, vocab=vocab, chunk_size=128)
    for r in (small, large):
        assert 2 * r["chunk_logits"] <= r["activations"] <= 4 * r["chunk_logits"]
    # 4x the tokens: the full logits would grow by 3 x 512 x vocab floats; the chunked step grows by < 1/4 chunk
    assert large["activations"] - small["activations"] < r["chunk_logits"] / 4
    assert large["full_logits"] - small["full_logits"] > 10 * r["chunk_logits"]


def test_unchunked_peak_holds_the_full_logits(bench):
    r = bench.logprob_step_peak(num_tokens=512, hidden=32, vocab=4096, chunk_size=512)
    assert r["activations"] >= 2 * r["full_logits"]
