"""The vLLM engine (generation.backend=vllm) against the built-in sampler on the same weights in fp32: greedy
equal, sampling log-probs equal the teacher-forced ones, stops agree, and after a weight sync the outputs
follow the new weights. Runs in `make test-vllm` (its own environment, .venv-vllm/); skipped with a reason
where vLLM is not installed, unless NEMO_ALIGNER_REQUIRE_VLLM=1 (make test-vllm), where that is a failure."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (no spawn)

try:
    import vllm  # noqa: F401
except ImportError as err:
    if os.environ.get("NEMO_ALIGNER_REQUIRE_VLLM") == "1":
        raise ImportError(f"NEMO_ALIGNER_REQUIRE_VLLM=1 but vLLM does not import: {err}") from err
    pytest.skip("vLLM is not installed (its tests run in `make test-vllm`, which builds .venv-vllm/)",
                allow_module_level=True)

from nemo_aligner.generation import Sampler, SamplingParams, eos_token_ids  # noqa: E402
from nemo_aligner.generation.scoring import completion_logprobs  # noqa: E402
from nemo_aligner.generation.vllm_engine import VLLMEngine  # noqa: E402
from nemo_aligner.models.hf import load_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(our model, its tokenizer, EOS ids, a vLLM engine on the same folder): a 2-layer Llama with the demo
    tokenizer (head_dim 64: vLLM's CPU attention has no kernel for 16)."""
    import transformers

    from nemo_aligner.data.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=400,
                                      max_position_embeddings=512, initializer_range=0.2, bos_token_id=1,
                                      eos_token_id=4, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    tokenizer.save(folder)
    tokenizer = Tokenizer.from_path(folder)
    eos = eos_token_ids(tokenizer, folder)
    engine = VLLMEngine(str(folder), tokenizer, eos, dtype="float32", max_model_len=256, max_num_seqs=8,
                        enforce_eager=True, kv_cache_gib=0.25)
    return load_pretrained(folder).eval(), tokenizer, eos, engine


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, 400, (n,), generator=g).tolist() for n in (7, 12, 3)]


def test_greedy_equals_the_builtin_sampler_on_the_same_weights(setup):
    model, tokenizer, eos, engine = setup
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=())
    ours = Sampler(model, tokenizer, eos).generate(_prompts(), params)
    theirs = engine.generate(_prompts(), params)
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    assert [c.finish_reason for c in theirs] == ["length"] * 3
    for a, b in zip(theirs, ours):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.text == b.text


def test_stops_agree_with_the_builtin_sampler(setup):
    model, tokenizer, eos, engine = setup
    free = Sampler(model, tokenizer, eos).generate(_prompts(), SamplingParams(max_new_tokens=12, temperature=0,
                                                                             stop_token_ids=()))
    stop_id = free[0].token_ids[4]
    text = free[1].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop_id,), stop=(stop,))
    ours = Sampler(model, tokenizer, eos).generate(_prompts(), params)
    theirs = engine.generate(_prompts(), params)
    for a, b in zip(theirs, ours):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                         b.stop_reason)
    assert ours[0].stop_reason == stop_id and ours[0].finish_reason == "stop"


def test_sampling_logprobs_are_those_at_the_temperature_before_truncation(setup):
    model, _, _, engine = setup
    for settings in (dict(temperature=0.8), dict(temperature=0.8, top_k=20, top_p=0.9)):
        params = SamplingParams(max_new_tokens=10, num_samples=2, seed=3, stop_token_ids=(), **settings)
        if "top_k" in settings:
            engine.scorer = model  # truncation: rescored teacher-forced (what sync_weights sets)
        first, again = engine.generate(_prompts(), params), engine.generate(_prompts(), params)
        assert [c.token_ids for c in first] == [c.token_ids for c in again]  # seeded
        for c in first:
            want = completion_logprobs(model, _prompts()[c.prompt_index], c.token_ids, 0.8)
            assert c.logprobs == pytest.approx(want, abs=1e-4)


def test_after_a_weight_sync_the_outputs_follow_the_new_weights(setup):
    model, tokenizer, eos, engine = setup
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=())
    before = [c.token_ids for c in engine.generate(_prompts(), params)]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    engine.sync_weights(model)
    after = [c.token_ids for c in engine.generate(_prompts(), params)]
    assert after != before
    assert after == [c.token_ids for c in Sampler(model, tokenizer, eos).generate(_prompts(), params)]
    model.load_state_dict(original)
    engine.sync_weights(model)
    assert [c.token_ids for c in engine.generate(_prompts(), params)] == before


def test_the_generate_cli_with_the_vllm_backend_writes_what_the_builtin_one_writes(setup, tmp_path):
    import json

    from omegaconf import OmegaConf

    from nemo_aligner.config import GenerateRunConfig, load_config
    from nemo_aligner.recipes.generate import run_generate

    model, tokenizer, _, engine = setup
    folder = Path(engine.llm.llm_engine.model_config.model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The sky is", "Bananas are")))
    out = {}
    for backend in ("builtin", "vllm"):
        raw = OmegaConf.from_dotlist([
            f"pretrained_checkpoint.restore_from_path={folder}", f"generation.backend={backend}",
            f"generation.input_file={prompts}", f"generation.output_file={tmp_path / backend}",
            "generation.temperature=0", "generation.max_new_tokens=8", "generation.progress_bar=false"])
        run_generate(load_config(raw, GenerateRunConfig))
        out[backend] = [json.loads(line) for line in (tmp_path / backend).read_text().splitlines()]
    for a, b in zip(out["vllm"], out["builtin"]):
        assert (a["completion_token_ids"], a["completions"], a["finish_reasons"]) == (
            b["completion_token_ids"], b["completions"], b["finish_reasons"])
        assert a["completion_logprobs"][0] == pytest.approx(b["completion_logprobs"][0], abs=1e-4)
