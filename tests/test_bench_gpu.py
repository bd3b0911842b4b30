"""benchmarks/bench_gpu.py on CPU: the dry run executes the real step code, the no-GPU error is clear,
and the FLOP formula matches torch's FLOP counter on the matmuls it can see."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nemo_aligner.losses.logprobs import token_logprobs
from nemo_aligner.models.gpt import GPTConfig, GPTModel

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_executes_every_run_on_cpu(bench, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    results = bench.main(["--dry-run", "--steps", "1", "--warmup", "1", "--pack-sizes", "64", "--json", str(out_json)])
    names = [r.name for r in results]
    assert names == ["sft packed 64", "sft padded (same seqs)", "dpo packed 64", "dpo padded (same seqs)"]
    for r in results:
        assert r.error is None and r.tokens_per_s > 0 and r.tflops > 0 and 0 < r.fill <= 1
        assert set(r.phases_ms) == {"reference", "forward", "backward", "optimizer", "other"}
        assert (r.phases_ms["reference"] > 0) == r.name.startswith("dpo")
        assert r.mfu is None and r.peak_gib is None  # no GPU: no peak to compare with, no CUDA allocator
    padded = {r.name.split()[0]: r.fill for r in results if "padded" in r.name}
    assert all(fill < 1 for fill in padded.values())  # the padded twin really pads
    printed = capsys.readouterr().out
    assert "SDPA + block-diagonal mask" in printed and "6*N_blocks*T" in printed and "MFU" in printed
    assert out_json.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_without_cuda_it_fails_clearly(bench):
    with pytest.raises(SystemExit, match="bench_gpu.py needs a CUDA GPU"):
        bench.main([])


@pytest.mark.parametrize("length,window", [(1, None), (7, None), (7, 3), (7, 7), (7, 20)])
def test_causal_pairs_counts_the_allowed_query_key_pairs(bench, length, window):
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    assert bench.causal_pairs(length, window) == int(allowed.sum())


@pytest.mark.parametrize("train", [False, True])
def test_flop_formula_matches_the_flop_counter(bench, train):
    # The counter sees attention as full s x s matmuls (math backend), and the chunked log-probs'
    # recomputed logits in backward; the formula counts the causal half and no recompute.
    cfg = GPTConfig(**bench.MODELS["tiny"])
    torch.manual_seed(0)
    model = GPTModel(cfg)
    s = 40
    ids = torch.randint(0, cfg.vocab_size, (1, s))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(train):
        hidden = model(ids)[0]
        logps = token_logprobs(hidden[:-1], model.output_weight, ids[0, 1:], chunk_size=16)
        if train:
            logps.sum().backward()
    work = bench.Work(tokens=s, scored=s - 1, attn_pairs=bench.causal_pairs(s), row_tokens=s)
    formula = bench.model_flops(cfg, bench.block_linear_weights(model), work, train)
    passes = 3 if train else 1
    per_pair = 4 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * passes
    recomputed_logits = 2 * cfg.hidden_size * cfg.vocab_size * (s - 1) if train else 0
    expected = formula - per_pair * work.attn_pairs + per_pair * s * s + recomputed_logits
    assert counter.get_total_flops() == expected


def test_peak_table_matches_device_names(bench):
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA GH200 480GB": 989.0, "NVIDIA A100-SXM4-80GB": 312.0}
    for name, peak in names.items():
        assert next(p for key, p in bench.PEAK_BF16_TFLOPS if key in name) == peak
    assert bench.peak_tflops(torch.device("cpu"), None) is None
    assert bench.peak_tflops(torch.device("cpu"), 123.0) == 123.0
