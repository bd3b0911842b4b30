"""The built-in KV-cache sampler (nemo_aligner.generation) against independent references.

Greedy token ids equal `transformers.generate` for every supported family (a batch of prompts of different
lengths, windows shorter than the sequences, soft-caps active, LongRoPE across its original context);
seeded sampling is reproducible and independent of the batch; returned log-probs equal a teacher-forced
`transformers` forward (logits / temperature) within 1e-4; top-k / top-p keep what transformers' warpers
keep and sample in proportion; every EOS id and stop strings stop with the right finish reason; LoRA on and
off; tensor parallel 2 through ParallelRun equals one process; prompts are tokenised as training does.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from nemo_aligner.generation import Sampler, SamplingParams, eos_token_ids, prompt_token_ids
from nemo_aligner.generation.sampling import candidates, choose_tokens, scaled_logprobs
from nemo_aligner.models.hf import load_pretrained
from tests.conftest import FAMILY_KINDS, HF_KINDS, tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
ALL_KINDS = HF_KINDS + FAMILY_KINDS
LENGTHS = (5, 13, 3)  # different lengths in one batch; with 12 new tokens the longest passes the 8-token windows


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash (conftest.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (folder, transformers model, our model), built on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            hf = tiny_hf_model(kind)
            folder = tmp_path_factory.mktemp(kind)
            hf.save_pretrained(folder)
            cache[kind] = (folder, hf, load_pretrained(folder).eval())
        return cache[kind]
    return get


def _prompts(vocab, lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_generate(hf, prompts, new_tokens, **kwargs):
    """transformers' greedy (or sampled) continuation of left-padded prompts: a list of id lists."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    return [row[width:].tolist() for row in out]


def _assert_same_or_near_tie(hf, prompt, ours, theirs):
    """Equal ids; a divergence is only accepted at a genuine near-tie (top-2 logits within 1e-4 in transformers)."""
    if ours == theirs:
        return
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + theirs[:k]])).logits[0, -1].float()
    top2 = logits.topk(2).values
    assert (top2[0] - top2[1]).item() < 1e-4, f"diverged at token {k}: ours {ours}, transformers {theirs}"


# ------------------------------------------------------------------------------------------ greedy parity
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_greedy_equals_transformers_generate_for_a_batch_of_different_lengths(models, kind):
    _, hf, model = models(kind)
    prompts = _prompts(model.config.vocab_size)
    got = Sampler(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=()))
    want = _hf_generate(hf, prompts, 12)
    assert [c.finish_reason for c in got] == ["length"] * 3 and all(len(c.token_ids) == 12 for c in got)
    for prompt, completion, theirs in zip(prompts, got, want):
        _assert_same_or_near_tie(hf, prompt, completion.token_ids, theirs)


def test_longrope_generation_across_the_original_context_follows_transformers(models):
    """Phi-3's LongRoPE switches to its long factors once a sequence passes 32 tokens, and the cache is then
    recomputed with them: a 26-token prompt generates 14 tokens across that boundary as transformers does."""
    _, hf, model = models("phi3_longrope")
    prompt = _prompts(model.config.vocab_size, lengths=(26,))
    got = Sampler(model).generate(prompt, SamplingParams(max_new_tokens=14, temperature=0, stop_token_ids=()))
    _assert_same_or_near_tie(hf, prompt[0], got[0].token_ids, _hf_generate(hf, prompt, 14)[0])


def test_batch_size_and_samples_sharing_a_prefill_change_nothing(models):
    _, _, model = models("qwen3_window")
    prompts = _prompts(model.config.vocab_size, lengths=(4, 9, 2, 7, 5))
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, num_samples=3, seed=5)
    one = Sampler(model, batch_size=1).generate(prompts, params)  # one prompt (its 3 samples) per batch
    big = Sampler(model, batch_size=64).generate(prompts, params)
    assert [(c.prompt_index, c.sample_index) for c in big] == [(i, j) for i in range(5) for j in range(3)]
    assert [c.token_ids for c in one] == [c.token_ids for c in big]
    for a, b in zip(one, big):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


# ------------------------------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible_and_the_seed_matters(models):
    _, _, model = models("llama_gqa_llama3_rope")
    prompts = _prompts(model.config.vocab_size)
    params = SamplingParams(max_new_tokens=16, temperature=1.2, num_samples=2, seed=11)
    first, again = Sampler(model).generate(prompts, params), Sampler(model).generate(prompts, params)
    other = Sampler(model).generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.2, num_samples=2, seed=12))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert first[0].token_ids != first[1].token_ids  # two samples of one prompt differ


@pytest.mark.parametrize("kind,settings", [
    ("llama_gqa_llama3_rope", dict(temperature=0.7)),
    ("gemma2_softcap", dict(temperature=0.7, top_k=10, top_p=0.9)),  # final soft-cap before the temperature
    ("phi3_longrope", dict(temperature=1.3, top_p=0.8)),
    ("mistral_window", dict(temperature=0)),  # greedy: the untempered distribution
])
def test_logprobs_equal_a_teacher_forced_transformers_forward(models, kind, settings):
    _, hf, model = models(kind)
    prompts = _prompts(model.config.vocab_size, lengths=(6, 11))
    got = Sampler(model).generate(prompts, SamplingParams(max_new_tokens=14, stop_token_ids=(), seed=2, **settings))
    temperature = settings["temperature"] or 1.0
    for completion in got:
        prompt = prompts[completion.prompt_index]
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logps = torch.log_softmax(hf(ids).logits[0].float() / temperature, dim=-1)
        want = logps[len(prompt) - 1:-1].gather(1, ids[0, len(prompt):, None])[:, 0]
        assert (torch.tensor(completion.logprobs) - want).abs().max().item() <= 1e-4


def test_top_k_and_top_p_keep_what_transformers_warpers_keep():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in ((0, 0.9), (20, 1.0), (20, 0.7), (5, 0.3), (0, 0.05)):
        warped = logits / 0.8
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        probs, ids = candidates(scaled_logprobs(logits, 0.8), top_k, top_p)
        for row in range(6):
            kept = set(ids[row][probs[row] > 0].tolist())
            assert kept == set(torch.nonzero(warped[row] > float("-inf"))[:, 0].tolist()), (top_k, top_p, row)
            want = torch.softmax(warped[row], -1)[ids[row]]
            assert torch.allclose(probs[row], want, atol=1e-6)


def test_sampled_tokens_follow_the_truncated_distribution():
    """50k draws from one row: frequencies within 5 standard errors of the kept tokens' renormalised
    probabilities; truncated tokens never drawn; the log-probs are the untruncated tempered ones."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 50_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, logps = choose_tokens(logits.expand(n, -1), 0.9, 5, 0.9, uniforms)
    probs, ids = candidates(scaled_logprobs(logits, 0.9), 5, 0.9)
    want = torch.zeros(7, dtype=torch.float64).index_add(0, ids[0], probs[0].double())
    freq = torch.bincount(tokens, minlength=7).double() / n
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-12), (freq, want)
    assert want[4:].sum() == 0 and freq[4:].sum() == 0  # top_p=0.9 cut the tail inside the top 5
    assert torch.allclose(logps, torch.log_softmax(logits / 0.9, -1)[0, tokens])


# ------------------------------------------------------------------------------------------ stopping
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A FAMILY checkpoint with the demo tokenizer and a generation_config.json naming two more EOS ids."""
    from nemo_aligner.data.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("chat")
    hf = tiny_hf_model("qwen3_tied")
    hf.save_pretrained(folder)
    tokenizer = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    tokenizer.save(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id, 7, 9]}))
    return folder, Tokenizer.from_path(folder), load_pretrained(folder).eval()


def test_eos_ids_come_from_the_tokenizer_and_generation_config(chat_model):
    folder, tokenizer, _ = chat_model
    assert eos_token_ids(tokenizer, folder) == (tokenizer.eos_id, 7, 9)
    assert eos_token_ids(tokenizer, None) == (tokenizer.eos_id,)


def test_every_eos_id_stops_generation(chat_model):
    _, tokenizer, model = chat_model
    prompts = _prompts(400, lengths=(6, 4))
    free = Sampler(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=10, temperature=0,
                                                                     stop_token_ids=()))
    for completion in free:
        for k in (0, 3):  # the first generated token, and one in the middle (first occurrence counts)
            eos = completion.token_ids[k]
            first = completion.token_ids.index(eos)
            sampler = Sampler(model, tokenizer, eos_token_ids=(tokenizer.eos_id, eos))
            (got,) = sampler.generate([prompts[completion.prompt_index]], SamplingParams(max_new_tokens=10,
                                                                                          temperature=0))
            assert got.token_ids == completion.token_ids[:first + 1]
            assert (got.finish_reason, got.stop_reason) == ("stop", eos)
            assert len(got.logprobs) == len(got.token_ids)
    assert {c.finish_reason for c in free} == {"length"}


def test_stop_strings_stop_and_cut_the_text(chat_model):
    _, tokenizer, model = chat_model
    prompt = _prompts(400, lengths=(6,))
    (free,) = Sampler(model, tokenizer).generate(prompt, SamplingParams(max_new_tokens=12, temperature=0,
                                                                        stop_token_ids=()))
    text = tokenizer.decode(free.token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    (got,) = Sampler(model, tokenizer).generate(prompt, SamplingParams(max_new_tokens=12, temperature=0,
                                                                       stop_token_ids=(), stop=("@@never@@", stop)))
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    assert got.text == text[:text.find(stop)]
    completed = tokenizer.decode(got.token_ids, skip_special_tokens=True)
    assert stop in completed and stop not in tokenizer.decode(got.token_ids[:-1], skip_special_tokens=True)
    assert got.token_ids == free.token_ids[:len(got.token_ids)]


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_adapters_on_equal_the_merged_model_and_off_equal_the_base(models, tmp_path):
    from nemo_aligner.config.sections import LoraConfig
    from nemo_aligner.models.hf.peft import save_merged
    from nemo_aligner.models.lora import adapters_disabled, apply_lora

    folder, _, _ = models("olmo2")
    model = load_pretrained(folder).eval()
    base = Sampler(model).generate(_prompts(400), SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=()))
    apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=4, row_init_method="normal"))
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=())
    on = Sampler(model).generate(_prompts(400), params)
    with adapters_disabled(model):
        off = Sampler(model).generate(_prompts(400), params)
    merged = load_pretrained(save_merged(model, tmp_path / "merged")).eval()
    assert [c.token_ids for c in off] == [c.token_ids for c in base]
    assert [c.token_ids for c in on] == [c.token_ids for c in Sampler(merged).generate(_prompts(400), params)]
    assert [c.token_ids for c in on] != [c.token_ids for c in base]  # the adapters matter
    assert model.training is False


# ------------------------------------------------------------------------------------------ tensor parallel
def _tp_worker(rank, port, folders, out_dir):
    import torch.distributed as dist

    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.parallel.mesh import LaunchEnv, init_parallel
    from nemo_aligner.parallel.run import ParallelRun
    from types import SimpleNamespace

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    trainer = SimpleNamespace(num_nodes=1, devices=2, accelerator="cpu")
    model_cfg = SimpleNamespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, global_batch_size=2,
                                micro_batch_size=1)
    parallel = init_parallel(trainer, model_cfg, LaunchEnv.from_environ())
    Path(out_dir, f"rendezvous_{rank}").touch()
    try:
        results = {}
        for kind, folder in folders.items():
            model = load_pretrained(folder)
            prompts = _prompts(model.config.vocab_size)
            sampler = Sampler.for_run(ParallelRun(parallel, model, LogProbHead()))
            for name, params in _TP_PARAMS.items():
                results[kind, name] = [(c.token_ids, c.logprobs) for c in sampler.generate(prompts, params)]
        if rank == 0:
            Path(out_dir, "tp.json").write_text(json.dumps({f"{k}|{n}": v for (k, n), v in results.items()}))
    finally:
        dist.destroy_process_group()


_TP_PARAMS = {"greedy": SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=()),
              "sampled": SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, num_samples=2, seed=3,
                                        stop_token_ids=())}
_TP_KINDS = ["gemma2_softcap", "qwen3_window", "gpt2"]  # soft-caps + tied vocab shards, q/k norms, learned positions


def test_tensor_parallel_2_generation_equals_one_process(models, tmp_path):
    import torch.multiprocessing as mp

    from tests.test_lora import _free_port

    folders = {kind: str(models(kind)[0]) for kind in _TP_KINDS}
    for attempt in range(2):
        out = tmp_path / f"try{attempt}"
        out.mkdir()
        try:
            mp.spawn(_tp_worker, args=(_free_port(), folders, str(out)), nprocs=2, join=True)
            break
        except Exception:
            if attempt == 1 or all((out / f"rendezvous_{r}").exists() for r in range(2)):
                raise
    tp = json.loads((out / "tp.json").read_text())
    for kind in _TP_KINDS:
        model = models(kind)[2]
        for name, params in _TP_PARAMS.items():
            single = Sampler(model).generate(_prompts(model.config.vocab_size), params)
            got = tp[f"{kind}|{name}"]
            assert [ids for ids, _ in got] == [c.token_ids for c in single], (kind, name)
            for (_, logps), c in zip(got, single):
                assert logps == pytest.approx(c.logprobs, abs=1e-4)


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_are_tokenised_as_training_tokenises_them(chat_model, tmp_path):
    from nemo_aligner.data.dataset import TokenizeSettings
    from nemo_aligner.data.preference.dataset import PreferenceDataset
    from nemo_aligner.data.sft.dataset import SFTDataset
    from nemo_aligner.data.sft.tokenize import SFTTokenizeSettings

    _, tokenizer, _ = chat_model
    dpo_rows = [json.loads(line) for line in (ROOT / "nemo_aligner/demo/data/dpo_val.jsonl").read_text().splitlines()[:3]]
    dpo = PreferenceDataset.from_files([ROOT / "nemo_aligner/demo/data/dpo_val.jsonl"], tokenizer,
                                       TokenizeSettings(seq_length=512))
    for row, pair in zip(dpo_rows, dpo.examples):
        assert prompt_token_ids(row["prompt"], tokenizer) == pair.prompt.tolist()
    sft_rows = [json.loads(line) for line in (ROOT / "nemo_aligner/demo/data/sft_val.jsonl").read_text().splitlines()[:3]]
    sft = SFTDataset.from_files([ROOT / "nemo_aligner/demo/data/sft_val.jsonl"], tokenizer,
                                SFTTokenizeSettings(seq_length=512))
    for row, example in zip(sft_rows, sft.examples):
        ids = prompt_token_ids(row["messages"][:-1], tokenizer)
        first_label = int(example.label_mask.argmax())
        assert ids == example.ids[:first_label].tolist()  # the prompt of the trained reply, to the token


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), r"SamplingParams\.temperature=-1\.0; expected >= 0 \(0 = greedy\)"),
    (dict(top_p=0.0), r"SamplingParams\.top_p=0\.0; expected 0 < top_p <= 1"),
    (dict(top_k=-2), r"SamplingParams\.top_k=-2; expected >= 0"),
    (dict(max_new_tokens=0), r"SamplingParams\.max_new_tokens=0; expected a positive integer"),
    (dict(num_samples=2, temperature=0), r"SamplingParams\.num_samples=2 with SamplingParams\.temperature=0"),
    (dict(stop=("",)), r"SamplingParams\.stop=\[''\]; expected a list of non-empty strings"),
])
def test_bad_sampling_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_named(models):
    _, _, model = models("gpt2")  # learned positions: 64 at most
    sampler = Sampler(model)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match=r"prompt 1 has no tokens"):
        sampler.generate([[1, 2], []], params)
    with pytest.raises(ValueError, match=r"prompt 0 has token id 128 outside the model's vocabulary \[0, 128\)"):
        sampler.generate([[1, 128]], params)
    with pytest.raises(ValueError, match=r"prompt 0 has 64 tokens; the model's max_position_embeddings=64"):
        sampler.generate([[1] * 64], params)
    (c,) = sampler.generate([[1] * 60], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=()))
    assert (len(c.token_ids), c.finish_reason) == (4, "length")  # stopped at the end of the learned positions
    with pytest.raises(ValueError, match=r"stop strings\) needs a Sampler built with a tokenizer"):
        sampler.generate([[1, 2]], SamplingParams(max_new_tokens=4, stop=("x",)))


# ------------------------------------------------------------------------------------------ data parallel
def _dp_worker(rank, port, folder, out_dir):
    import torch.distributed as dist

    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.parallel.mesh import LaunchEnv, init_parallel
    from nemo_aligner.parallel.run import ParallelRun
    from types import SimpleNamespace

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    parallel = init_parallel(SimpleNamespace(num_nodes=1, devices=2, accelerator="cpu"),
                             SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             global_batch_size=2, micro_batch_size=1), LaunchEnv.from_environ())
    Path(out_dir, f"rendezvous_{rank}").touch()
    try:
        run = ParallelRun(parallel, load_pretrained(folder), LogProbHead())  # FSDP2 over dp = 2
        prompts = _prompts(400)
        mine = prompts[:2] if rank == 0 else prompts[2:]  # ranks decode different prompts and lengths
        params = SamplingParams(max_new_tokens=9, temperature=0.9, seed=4, stop_token_ids=())
        got = Sampler.for_run(run).generate(mine, params, first_index=0 if rank == 0 else 2)
        ids = torch.tensor([prompts[0]])
        run.policy(ids, labels=torch.roll(ids, -1, 1)).sum().backward()  # the sharded model still trains
        Path(out_dir, f"dp{rank}.json").write_text(json.dumps([c.token_ids for c in got]))
    finally:
        dist.destroy_process_group()


def test_data_parallel_fsdp_ranks_generate_their_own_prompts_as_one_process(models, tmp_path):
    """Each FSDP rank gathers the weights for its call and samples its share; with first_index the union
    is what one process samples (seeds follow the global prompt index)."""
    import torch.multiprocessing as mp

    from tests.test_lora import _free_port

    folder, _, model = models("qwen3_window")
    for attempt in range(2):
        out = tmp_path / f"try{attempt}"
        out.mkdir()
        try:
            mp.spawn(_dp_worker, args=(_free_port(), str(folder), str(out)), nprocs=2, join=True)
            break
        except Exception:
            if attempt == 1 or all((out / f"rendezvous_{r}").exists() for r in range(2)):
                raise
    got = json.loads((out / "dp0.json").read_text()) + json.loads((out / "dp1.json").read_text())
    params = SamplingParams(max_new_tokens=9, temperature=0.9, seed=4, stop_token_ids=())
    assert got == [c.token_ids for c in Sampler(model).generate(_prompts(400), params)]


# ------------------------------------------------------------------------------------------ opt-in: a real model
@pytest.mark.skipif(not os.environ.get("NEMO_ALIGNER_REAL_MODEL"),
                    reason="set NEMO_ALIGNER_REAL_MODEL=/path/to/a/chat/model (e.g. SmolLM2-135M-Instruct)")
def test_real_chat_model_greedy_equals_transformers():
    import transformers

    from nemo_aligner.data.tokenizer import Tokenizer

    folder = os.environ["NEMO_ALIGNER_REAL_MODEL"]
    tokenizer = Tokenizer.from_path(folder)
    ids = [prompt_token_ids([{"role": "user", "content": q}], tokenizer)
           for q in ("What is the capital of France?", "Who wrote Romeo and Juliet?")]
    ours = Sampler(load_pretrained(folder).eval(), tokenizer, eos_token_ids(tokenizer, folder)).generate(
        ids, SamplingParams(max_new_tokens=24, temperature=0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    for prompt, completion in zip(ids, ours):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        assert completion.token_ids == out[0, len(prompt):].tolist()
    assert "Paris" in ours[0].text
