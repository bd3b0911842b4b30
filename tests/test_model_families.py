"""Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2 against `transformers`, on tiny random models with
non-trivial norm weights (tests/conftest.py FAMILY_KINDS: windows shorter than the sequences, soft-capping
active, tied and untied, GQA, LongRoPE with sequences on both sides of its original context).

Per family: logits parity; export bit-exact and loadable by AutoModelForCausalLM; a from-scratch model
exports as its family; a pack equals its sequences alone (also through the varlen plumbing, with each
layer's own window); chunked log-probs apply the final soft-cap; PEFT adapters (Phi-3's fused projections
too); tensor parallel 2 (and sequence parallel) equals one process; one DPO step through the recipe.
"""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.hf import config_from_pretrained, infer_model_type, load_pretrained, save_pretrained
from tests.conftest import FAMILY_KINDS, tiny_hf_model
from tests.test_fast_paths import fake_varlen  # noqa: F401 (a fixture: the CUDA varlen kernel faked on CPU)
from tests.test_lora import _free_port

ROOT = Path(__file__).resolve().parents[1]
V = 400
MODEL_TYPE = {"qwen3_window": "qwen3", "qwen3_tied": "qwen3", "gemma2_softcap": "gemma2", "gemma2_untied": "gemma2",
              "gemma3_text": "gemma3_text", "gemma3_untied": "gemma3_text", "phi3_longrope": "phi3",
              "phi3_tied": "phi3", "olmo2": "olmo2", "olmo2_tied": "olmo2"}
ONE_PER_FAMILY = ["qwen3_window", "gemma2_softcap", "gemma3_text", "phi3_longrope", "olmo2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (folder with the saved transformers model and the demo tokenizer, the live model)."""
    from nemo_aligner.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    out = {}
    for kind in FAMILY_KINDS:
        model = tiny_hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        tokenizer.save(folder)
        out[kind] = (folder, model)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only thrash on shared cores
    yield
    torch.set_num_threads(threads)


def _ids(seed=1, batch=2, length=40):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_logits_match_transformers(checkpoints, kind):
    folder, hf_model = checkpoints[kind]
    model = load_pretrained(folder).eval()
    assert model.hf_model_type == MODEL_TYPE[kind]
    for length in (20, 40):  # inside and beyond the 8-token windows and Phi-3's 32-token original context
        ids = _ids(length=length)
        with torch.no_grad():
            diff = _max_diff(model.logits(ids), hf_model(ids).logits)
        print(f"{kind} T={length}: max abs logit diff {diff:.2e}")
        assert diff <= 1e-4, f"{kind}: max abs logit diff {diff}"


def test_the_parity_tests_see_soft_caps_windows_and_longrope(checkpoints):
    """Each feature changes the logits by far more than the tolerance, so a missing one would fail parity."""
    ids = _ids()

    def gap(kind, change):
        folder, hf_model = checkpoints[kind]
        model = load_pretrained(folder).eval()
        change(model)
        with torch.no_grad():
            return _max_diff(model.logits(ids), hf_model(ids).logits)

    def attention(model, **settings):
        for layer in model.layers.values():
            for key, value in settings.items():
                setattr(layer.self_attention, key, value)

    assert gap("gemma2_softcap", lambda m: attention(m, logit_softcapping=None)) > 1e-2
    assert gap("gemma2_softcap", lambda m: setattr(m.config, "final_logit_softcapping", None)) > 1e-2
    assert gap("qwen3_window", lambda m: attention(m, sliding_window=None)) > 1e-2
    assert gap("gemma3_text", lambda m: attention(m, rope_table="global")) > 1e-2
    assert gap("phi3_longrope", lambda m: setattr(m.rotary, "long_inv_freq", None)) > 1e-2


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_export_round_trip_is_bit_exact_and_loads_in_transformers(checkpoints, tmp_path, kind):
    import transformers

    folder, hf_model = checkpoints[kind]
    model = load_pretrained(folder)
    out = save_pretrained(model, tmp_path / "export")
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(reloaded(ids).logits, model.logits(ids)) <= 1e-5
    again = load_pretrained(out)
    assert again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ONE_PER_FAMILY + ["phi3_tied"])
def test_a_model_built_from_scratch_exports_as_its_family(checkpoints, tmp_path, kind):
    import transformers

    config, model_type = config_from_pretrained(checkpoints[kind][0])
    torch.manual_seed(0)
    model = GPTModel(config).eval()  # our own init: Gemma's (1 + w) norms start at w = 0
    expected = "llama" if kind == "phi3_tied" else model_type  # plain Phi-3 is Llama's architecture
    assert infer_model_type(config) == expected
    out = save_pretrained(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, model.logits(ids)) <= 1e-4


def test_existing_configs_infer_the_same_model_type():
    base = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4)
    assert infer_model_type(GPTConfig(**base)) == "llama"
    assert infer_model_type(GPTConfig(**base, add_qkv_bias=True)) == "qwen2"
    assert infer_model_type(GPTConfig(**base, sliding_window=16)) == "mistral"
    assert infer_model_type(GPTConfig(**base, position_embedding_type="learned_absolute")) == "gpt2"


# ------------------------------------------------------------------------------------------ packing
def _packed_rows():
    """Row 0: sequences of 13, 40 and 7 tokens (40 > the 8-token windows and > Phi-3's original 32, so only
    that sequence takes LongRoPE's long factors); row 1: one sequence of 60."""
    lengths = [[13, 40, 7], [60]]
    segments = torch.tensor([sum(([k] * n for k, n in enumerate(row)), []) for row in lengths])
    return _ids(seed=2, length=60), segments, lengths


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_a_pack_equals_its_sequences_run_alone(checkpoints, kind):
    model = load_pretrained(checkpoints[kind][0]).eval()
    ids, segments, lengths = _packed_rows()
    with torch.no_grad():
        packed = model.logits(ids, segment_ids=segments)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model.logits(ids[row:row + 1, start:start + n])[0]
                assert _max_diff(packed[row, start:start + n], alone) <= 1e-5, (kind, row, n)
                start += n


def test_varlen_gets_each_layers_window_and_softcapped_layers_keep_the_mask_path(checkpoints, fake_varlen):
    ids, segments, _ = _packed_rows()
    for kind, windows in (("gemma3_text", [(7, 0), (-1, 0), (7, 0)]), ("gemma2_untied", [])):
        model = load_pretrained(checkpoints[kind][0]).eval()
        fake_varlen.calls.clear()
        with torch.no_grad():
            model.use_varlen = False
            reference = model.logits(ids, segment_ids=segments)
            model.use_varlen = True
            got = model.logits(ids, segment_ids=segments)
        assert [call["window"] for call in fake_varlen.calls] == windows, kind  # soft-capped: never varlen
        assert _max_diff(got, reference) <= 1e-5, kind


# ------------------------------------------------------------------ compile, checkpointing, pipeline stages
@pytest.mark.parametrize("kind", ["gemma2_softcap", "gemma3_text", "phi3_longrope", "olmo2"])
def test_compiled_blocks_and_activation_checkpointing_match_eager(checkpoints, kind):
    import copy

    from nemo_aligner.models.compile import compile_blocks

    eager = load_pretrained(checkpoints[kind][0])
    ids, segments, _ = _packed_rows()

    def logits_and_grads(model):
        logits = model.logits(ids, segment_ids=segments)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    want, want_grads = logits_and_grads(eager)
    for checkpointing in (False, True):
        model = copy.deepcopy(eager)
        model.zero_grad(set_to_none=True)
        model.config.activations_checkpointing = checkpointing
        compile_blocks(model, backend="aot_eager", fullgraph=True)  # the graph inductor would get, in ~1 s
        got, grads = logits_and_grads(model)
        assert _max_diff(got, want) <= 1e-6
        assert all(_max_diff(g, w) <= 1e-5 * max(1.0, w.abs().max().item()) for g, w in zip(grads, want_grads))


@pytest.mark.parametrize("kind", ["gemma2_untied", "olmo2"])
def test_pipeline_stages_chained_equal_the_whole_model(checkpoints, kind):
    import copy

    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.models.heads import ModelWithHead
    from nemo_aligner.parallel.pipeline import prune_to_stage

    model = load_pretrained(checkpoints[kind][0]).eval()
    ids, segments, _ = _packed_rows()
    labels = torch.roll(ids, -1, dims=1)
    first = ModelWithHead(prune_to_stage(copy.deepcopy(model), range(0, 1), True, False), None)
    last = ModelWithHead(prune_to_stage(copy.deepcopy(model), range(1, 3), False, True), LogProbHead())
    with torch.no_grad():
        want = ModelWithHead(model, LogProbHead())(ids, labels=labels, segment_ids=segments)
        hidden = first(ids, labels=labels, segment_ids=segments)
        assert _max_diff(last(hidden, labels=labels, segment_ids=segments), want) <= 1e-6


# ------------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize("kind", ["gemma2_softcap", "gemma3_text"])
def test_chunked_logprobs_apply_the_final_softcap(checkpoints, kind):
    from nemo_aligner.algorithms.dpo import pair_sums
    from nemo_aligner.losses.logprobs import LogProbHead, token_logprobs
    from nemo_aligner.models.heads import ModelWithHead

    folder, hf_model = checkpoints[kind]
    model = load_pretrained(folder).eval()
    ids = _ids(length=24)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    with torch.no_grad():
        want_RT = torch.log_softmax(hf_model(ids).logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        want_RT = want_RT.masked_fill(labels == -100, 0)
        token_logps = ModelWithHead(model, LogProbHead(chunk_size=7))(ids, labels=labels)  # the training path
        assert _max_diff(token_logps, want_RT) <= 1e-4
        scored = labels != -100
        flat = token_logprobs(model(ids)[scored], model.output_weight, labels[scored], chunk_size=7,
                              logit_softcap=model.config.final_logit_softcapping)
        assert _max_diff(flat, want_RT[scored]) <= 1e-4
        # DPO's pair sums from the head's output: rows are chosen, rejected of one pair
        seq_index = torch.arange(2)[:, None].expand(2, 24)
        batch = SimpleNamespace(labels=labels, seq_index=seq_index, num_pairs=1)
        chosen, rejected, _, _ = pair_sums(batch, token_logps)
        assert _max_diff(torch.cat([chosen, rejected]), want_RT.sum(-1)) <= 1e-3


# ------------------------------------------------------------------------------------------- LoRA
def _lora_model(folder, targets):
    from nemo_aligner.config.sections import LoraConfig
    from nemo_aligner.models.lora import apply_lora, is_adapter_key

    model = load_pretrained(folder).eval()
    apply_lora(model, LoraConfig(target_modules=targets, adapter_dim=4, alpha=12))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("kind,targets", [("phi3_longrope", ["all"]), ("phi3_tied", ["qkv_proj", "down_proj"]),
                                          ("gemma2_softcap", ["all"]), ("olmo2", ["attention_qkv", "mlp_fc1"])])
def test_peft_loads_our_adapters(checkpoints, tmp_path, kind, targets):
    import peft
    import transformers

    from nemo_aligner.models.hf.peft import load_adapters, save_adapters, save_merged

    folder, hf_model = checkpoints[kind]
    ours = _lora_model(folder, targets)
    ids = _ids(length=20)
    with torch.no_grad():
        expected = ours.logits(ids)
        assert _max_diff(expected, hf_model(ids).logits) > 1e-3  # the adapters do something
    save_adapters(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    if kind.startswith("phi3"):
        assert "self_attn.qkv_proj" in config["target_modules"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    save_merged(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    restored = load_pretrained(folder).eval()
    load_adapters(restored, tmp_path / "adapter")
    with torch.no_grad():
        assert _max_diff(peft_model(ids).logits, expected) <= 1e-4
        assert _max_diff(merged(ids).logits, expected) <= 1e-4
        assert torch.equal(restored.logits(ids), expected)


def test_restores_a_phi3_adapter_trained_by_peft_on_the_fused_projections(checkpoints, tmp_path):
    import peft
    import transformers

    from nemo_aligner.models.hf.peft import load_adapters

    folder, _ = checkpoints["phi3_longrope"]
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    settings = peft.LoraConfig(init_lora_weights=False, target_modules=["qkv_proj", "gate_up_proj"], r=4,
                               lora_alpha=16)
    peft_model = peft.get_peft_model(base, settings).eval()
    peft_model.save_pretrained(tmp_path)
    ours = load_pretrained(folder).eval()
    assert len(load_adapters(ours, tmp_path)) == 3 * 5  # q, k, v, gate, up of 3 layers
    ids = _ids(length=20)
    with torch.no_grad():
        assert _max_diff(peft_model(ids).logits, ours.logits(ids)) <= 1e-4


# --------------------------------------------------------------------------------- tensor parallel
def _tp_outputs(model, mesh=None, sequence_parallel=False):
    """Hidden states, per-token log-probs (packed rows) and the full gradients of one backward."""
    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.models.heads import ModelWithHead
    from nemo_aligner.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_context

    module = ModelWithHead(model, LogProbHead(chunk_size=16))
    if mesh is not None:
        apply_tensor_parallel(module, mesh, sequence_parallel)
    ids, segments, _ = _packed_rows()
    labels = torch.roll(ids, -1, dims=1)
    with vocab_parallel_context(mesh is not None):
        hidden = model(ids, segment_ids=segments)
        logps = module(ids, labels=labels, segment_ids=segments)
        (logps * torch.linspace(0.5, 1.5, logps.numel()).view(logps.shape)).sum().backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {name: full(p.grad) for name, p in model.named_parameters()}
    return full(hidden).detach(), logps.detach(), grads


def _tp_worker(rank, port, folders, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    Path(out_dir, f"rendezvous_{rank}").touch()  # got past the rendezvous: later failures are real ones
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        results = {(kind, sp): _tp_outputs(load_pretrained(folder), mesh["tp"], sp)
                   for kind, folder in folders.items() for sp in (False, True)}
        if rank == 0:
            torch.save(results, Path(out_dir, "tp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(checkpoints, tmp_path_factory):
    """One spawn of 2 gloo processes for every family (tp2 and tp2 with sequence parallel); retried once with
    a fresh port when the rendezvous itself failed (a port taken between picking and binding)."""
    import torch.multiprocessing as mp

    folders = {kind: str(checkpoints[kind][0]) for kind in ONE_PER_FAMILY}
    for attempt in range(2):
        out = tmp_path_factory.mktemp("tp")
        try:
            mp.spawn(_tp_worker, args=(_free_port(), folders, str(out)), nprocs=2, join=True)
            return torch.load(out / "tp.pt", weights_only=True)
        except Exception:
            if attempt == 1 or all((out / f"rendezvous_{r}").exists() for r in range(2)):
                raise


@pytest.mark.parametrize("kind", ONE_PER_FAMILY)
def test_tensor_parallel_2_equals_one_process(checkpoints, tp_results, kind):
    hidden, logps, grads = _tp_outputs(load_pretrained(checkpoints[kind][0]))
    for sp in (False, True):
        tp_hidden, tp_logps, tp_grads = tp_results[kind, sp]
        assert _max_diff(tp_hidden, hidden) <= 1e-5, (kind, sp)
        assert _max_diff(tp_logps, logps) <= 1e-5, (kind, sp)
        assert tp_grads.keys() == grads.keys()
        for name, grad in grads.items():  # relative: Gemma's scaled, tied embedding has gradients ~1e4
            assert _max_diff(tp_grads[name], grad) <= 1e-5 * max(1.0, grad.abs().max().item()), (kind, sp, name)


# ------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("kind", ONE_PER_FAMILY)
def test_one_dpo_step_on_a_saved_checkpoint(checkpoints, tmp_path, monkeypatch, kind):
    import transformers

    from nemo_aligner.recipes.dpo import run_dpo
    from tests.helpers import DEMO_TRAIN, FAST, dpo_config, read_metrics

    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(open(DEMO_TRAIN).readlines()[:16]))
    folder, _ = checkpoints[kind]
    run = tmp_path / "run"
    result = run_dpo(dpo_config(run, *FAST, f"model.data.data_prefix.train=[{data}]",
                                f"model.data.data_prefix.validation=[{data}]",
                                f"pretrained_checkpoint.restore_from_path={folder}", "trainer.dpo.max_steps=1",
                                "trainer.dpo.limit_val_batches=1", "exp_manager.create_tensorboard_logger=false",
                                "exp_manager.create_checkpoint_callback=false"))
    assert result["initial_val"]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["train/loss"])
    assert json.loads((run / "hf/config.json").read_text())["model_type"] == MODEL_TYPE[kind]
    trained = load_pretrained(run / "hf").eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = _ids(length=20)
    with torch.no_grad():
        assert _max_diff(exported(ids).logits, trained.logits(ids)) <= 1e-4


# ------------------------------------------------------------------------------------------- errors
def _edit_config(checkpoints, kind, tmp_path, **changes):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints[kind][0], dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize("kind,changes,message", [
    ("gemma3_text", {"model_type": "gemma3"}, r"config\.json: model_type 'gemma3' \(Gemma3ForConditionalGeneration.*"
                                              r"only the text-only model_type 'gemma3_text'"),
    ("gemma2_softcap", {"use_bidirectional_attention": True}, r"config\.json: use_bidirectional_attention=true"),
    ("qwen3_window", {"attention_bias": True}, r"config\.json: attention_bias=true is not supported for model_type 'qwen3' \(biases on q/k/v and o"),
    ("olmo2", {"attention_bias": True}, r"config\.json: attention_bias=true is not supported for model_type 'olmo2' \(biases on q/k/v and o"),
    ("phi3_tied", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     r"config\.json: rope type 'dynamic' is not supported for phi3"),
    ("gemma2_untied", {"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
     r"config\.json: layer_types=\['full_attention', 'chunked_attention', 'full_attention'\]"),
    ("gemma3_untied", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"config\.json: rope_parameters\.sliding_attention rope type 'linear' is not supported"),
    ("gemma2_softcap", {"hidden_activation": "swish"}, r"config\.json: hidden_activation='swish' is not supported"),
])
def test_unsupported_settings_name_config_json_and_the_key(checkpoints, tmp_path, kind, changes, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained(_edit_config(checkpoints, kind, tmp_path, **changes))


def test_phi3_fused_tensor_of_the_wrong_size_is_named(checkpoints, tmp_path):
    from safetensors.torch import save_file

    dst = _edit_config(checkpoints, "phi3_tied", tmp_path)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.1.self_attn.qkv_proj.weight"] = tensors["model.layers.1.self_attn.qkv_proj.weight"][:-16]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.self_attn\.qkv_proj\.weight' has 176 rows but "
                                         r"config\.json implies 192 \(64 \+ 64 \+ 64 for q_proj, k_proj, v_proj\)"):
        load_pretrained(dst)


@pytest.mark.parametrize("kind,model_type,message", [
    ("gemma2_softcap", "mistral", r"cannot export as model_type='mistral': model\.layer_types="),
    ("olmo2", "llama", r"cannot export as model_type='llama': model\.qk_norm='full', expected 'none'"),
    ("qwen3_window", "qwen2", r"cannot export as model_type='qwen2': model\.add_qkv_bias=False"),
    ("phi3_longrope", "mistral", r"cannot export as model_type='mistral': model\.rotary_percent=0\.75"),
    ("gemma3_text", "gemma2", r"cannot export as model_type='gemma2': model\.qk_norm='head', expected 'none'"),
    ("gemma2_softcap", "gemma3_text", r"cannot export as model_type='gemma3_text': model\.qk_norm='none'"),
])
def test_export_refuses_what_the_family_cannot_express(checkpoints, tmp_path, kind, model_type, message):
    model = load_pretrained(checkpoints[kind][0])
    with pytest.raises(ValueError, match=message):
        save_pretrained(model, tmp_path / "x", model_type=model_type)


@pytest.mark.parametrize("kwargs,message", [
    (dict(layer_types=("sliding", "full")), r"model\.layer_types=\['sliding', 'full'\]; expected model\.num_layers=3"),
    (dict(layer_types=("sliding",) * 3), r"model\.layer_types has 'sliding' layers but model\.sliding_window is null"),
    (dict(qk_norm="layer"), r"model\.qk_norm='layer'; expected one of \['none', 'head', 'full'\]"),
    (dict(norm_placement="middle"), r"model\.norm_placement='middle'; expected one of \['pre', 'sandwich', 'post'\]"),
    (dict(attn_logit_softcapping=0.0), r"model\.attn_logit_softcapping=0\.0; expected a positive number or null"),
    (dict(rotary_percent=0.375), r"model\.rotary_percent=0\.375; expected 0 < p <= 1"),
    (dict(rope_scaling="longrope"), r"model\.rope_scaling='longrope' needs model\.rope_short_factor with 4 numbers"),
    (dict(layernorm_zero_centered_gamma=True, normalization="layernorm"),
     r"model\.layernorm_zero_centered_gamma=true needs model\.normalization='rmsnorm'"),
])
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, **kwargs)
