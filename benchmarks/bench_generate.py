"""Output tokens/s of the built-in KV-cache sampler, `transformers.generate` and vLLM (when installed) on the
same prompts, greedy, fp32, at batch 1 and batch 32, on a model of SmolLM2-135M's shape (random weights,
built locally) or on a real folder (--model).

    python benchmarks/bench_generate.py                          # builtin + transformers (+ vllm if importable)
    python benchmarks/bench_generate.py --model /work/tools/smollm2-135m-instruct --vllm-python .venv-vllm/bin/python

Every engine generates exactly --new-tokens per prompt (end-of-sequence ids ignored), so the token counts are
equal; the time includes prefill. Each figure is the best of --repeats runs after one warm-up. vLLM runs in a
subprocess of --vllm-python (its own environment, `make setup-vllm`) when it is not importable here.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, rms_norm_eps=1e-5)


def random_smollm2(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE))
    model.save_pretrained(folder)
    return folder


def prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(16, 49, (), generator=g)),), generator=g).tolist()
            for _ in range(num)]


def run_builtin(folder, batch, new_tokens, dtype="fp32"):
    from nemo_aligner.generation import Sampler, SamplingParams
    from nemo_aligner.models.hf import load_pretrained

    model = load_pretrained(folder, dtype=dtype).eval()
    ids = prompts(batch, model.config.vocab_size)
    sampler = Sampler(model, batch_size=batch)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    return lambda: [c.token_ids for c in sampler.generate(ids, params)]


def run_transformers(folder, batch, new_tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = prompts(batch, model.config.vocab_size)
    width = max(len(p) for p in ids)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(ids):
        input_ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    def go():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return out[:, width:].tolist()
    return go


def run_vllm(folder, batch, new_tokens):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from nemo_aligner.generation.vllm_engine import VLLMEngine
    from nemo_aligner.generation import SamplingParams

    engine = VLLMEngine(str(folder), max_num_seqs=max(batch, 1), dtype="float32", skip_tokenizer_init=True)
    ids = prompts(batch, SMOLLM2_SHAPE["vocab_size"])
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    return lambda: [c.token_ids for c in engine.generate(ids, params)]


ENGINES = {"builtin": run_builtin, "transformers": run_transformers, "vllm": run_vllm,
           # not part of the fp32 comparison: the built-in sampler on bf16 weights (generation.precision=bf16)
           "builtin-bf16": lambda folder, batch, new_tokens: run_builtin(folder, batch, new_tokens, "bf16")}


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def measure_here(engines, folder, args) -> dict:
    """{engine: {batch: (tokens/s, token ids)}}: engines of this process timed in turns (one warm-up, then
    --repeats rounds of each, best kept), so a busy machine slows them alike."""
    out = {engine: {} for engine in engines}
    for batch in args.batches:
        runs = {engine: ENGINES[engine](folder, batch, args.new_tokens) for engine in engines}
        best, ids = {e: float("inf") for e in engines}, {}
        for e, fn in runs.items():
            ids[e] = fn()  # warm-up
        for _ in range(args.repeats):
            for e, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[e] = min(best[e], time.perf_counter() - t0)
        for e in engines:
            out[e][batch] = (batch * args.new_tokens / best[e], ids[e])
        del runs
    return out


def measure_vllm_elsewhere(folder, args) -> dict:
    """{batch: (tokens/s, token ids)} of vLLM in a subprocess of --vllm-python ({} when that is missing)."""
    if not args.vllm_python or not Path(args.vllm_python).exists():
        return {}
    cmd = [args.vllm_python, __file__, "--model", str(folder), "--engines", "vllm", "--batches",
           *map(str, args.batches), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--json"]
    # vLLM's CPU worker sets its own thread count (1 unless OMP_NUM_THREADS says otherwise)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"vllm subprocess failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {}
    return {int(k): tuple(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1])["vllm"].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face folder; default: random weights of SmolLM2-135M's shape")
    parser.add_argument("--engines", nargs="+", default=["builtin", "transformers", "vllm"],
                        help=f"any of {sorted(ENGINES)}")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"))
    parser.add_argument("--json", action="store_true", help="print one JSON line (used for the vLLM subprocess)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else random_smollm2(Path(tmp) / "smollm2_shape")
        here = [e for e in args.engines if e != "vllm" or vllm_importable()]
        results = measure_here(here, folder, args)
        if "vllm" in args.engines and "vllm" not in here:
            results["vllm"] = measure_vllm_elsewhere(folder, args)
    if args.json:
        print(json.dumps({e: {b: list(v) for b, v in r.items()} for e, r in results.items()}))
        return
    print(f"model: {args.model or 'random SmolLM2-135M shape'}; greedy fp32, {args.new_tokens} new tokens per prompt, "
          f"{args.threads} threads; output tokens/s (best of {args.repeats})")
    reference = results.get("transformers", {})
    for batch in args.batches:
        for engine, result in results.items():
            if batch not in result:
                print(f"  batch {batch:3d}  {engine:12s}  (not run: vLLM not installed; `make setup-vllm`)")
                continue
            rate, ids = result[batch]
            line = f"  batch {batch:3d}  {engine:12s}  {rate:8.1f} tokens/s"
            if engine != "transformers" and batch in reference:
                same = sum(a == b for a, b in zip(ids, reference[batch][1]))
                line += f"  {rate / reference[batch][0]:.2f}x transformers; same tokens as transformers: {same}/{batch}"
            print(line)


if __name__ == "__main__":
    main()
