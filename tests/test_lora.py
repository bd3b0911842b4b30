"""LoRA: adapters off == base exactly, DPO with the adapter-toggled reference, exact resume, PEFT-format
export / restore / merge checked against `peft` and `transformers`, config errors, tensor parallel."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from nemo_aligner.config import ConfigError
from nemo_aligner.config.sections import LoraConfig
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.hf import load_pretrained
from nemo_aligner.models.hf.peft import load_adapters, save_adapters, save_merged
from nemo_aligner.models.lora import (
    LoRALinear, adapters_disabled, apply_lora, base_weights, is_adapter_key, resolve_target_modules,
)
from nemo_aligner.recipes.dpo import run_dpo
from tests.helpers import DEMO_TRAIN, FAST, assert_same_trajectory, comparable, dpo_config, read_metrics

LORA = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[all]",
        "model.peft.lora_tuning.adapter_dim=8", "exp_manager.create_tensorboard_logger=false"]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Tiny models gain nothing from intra-op threads (which thrash on shared cores), and the PNG of the
    curves is test_training_logging's business: drawing it costs seconds per run."""
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    cfg = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
               vocab_size=96)
    return GPTModel(GPTConfig(**{**cfg, **overrides})).eval()


def _randomize_adapters(model, std=0.1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


# ---------------------------------------------------------------------------------------------- the module
def test_adapters_off_equals_the_base_model_exactly():
    base = _tiny_model()
    model = _tiny_model()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    names = apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=4, alpha=8))
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        expected = base.logits(ids)
        assert torch.equal(model.logits(ids), expected)  # B = 0 at the start: adapters add exactly nothing
        _randomize_adapters(model)
        on = model.logits(ids)
        with adapters_disabled(model):
            off = model.logits(ids)
        assert torch.equal(off, expected)
        assert (on - expected).abs().max() > 1e-3
        assert torch.equal(model.logits(ids), on)  # switched back on after the block
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_key(n) for n in trainable)
    assert base_weights(model.state_dict()).keys() == base.state_dict().keys()


def test_scale_init_and_target_names():
    model = _tiny_model(activation="gelu")  # plain MLP: up_proj/down_proj only
    names = apply_lora(model, LoraConfig(target_modules=["c_attn", "c_fc"], adapter_dim=4, alpha=None,
                                         column_init_method="kaiming", row_init_method="zero"))
    assert sorted(n.split(".", 2)[2] for n in names if n.startswith("layers.0.")) == [
        "mlp.up_proj", "self_attention.k_proj", "self_attention.q_proj", "self_attention.v_proj"]
    module = model.get_submodule(names[0])
    assert module.scale == 1.0 and module.lora_B.weight.abs().sum() == 0 and module.lora_A.weight.abs().sum() > 0
    assert resolve_target_modules(["attention_qkv", "mlp_fc2"]) == ("q_proj", "k_proj", "v_proj", "down_proj")
    assert resolve_target_modules(["c_proj"]) == ("o_proj", "down_proj")
    assert resolve_target_modules(["attention_dense", "mlp_fc1"]) == ("o_proj", "gate_proj", "up_proj")
    with pytest.raises(ValueError, match="matches no projection"):
        apply_lora(_tiny_model(activation="gelu"), LoraConfig(target_modules=["gate_proj"]))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.peft\.lora_tuning\.target_modules=\['qkv'\]: unknown name\(s\) "
                                          r"\['qkv'\]; valid names: \['attention_qkv', .*'c_attn'"):
        dpo_config(tmp_path, *LORA, "model.peft.lora_tuning.target_modules=[qkv]")
    with pytest.raises(ConfigError, match=r"model\.dpo\.ref_mode=adapter needs model\.peft\.peft_scheme=lora"):
        dpo_config(tmp_path, "model.dpo.ref_mode=adapter")
    with pytest.raises(ConfigError, match=r"model\.peft\.lora_tuning\.row_init_method='ones'"):
        dpo_config(tmp_path, *LORA, "model.peft.lora_tuning.row_init_method=ones")
    with pytest.raises(ConfigError, match=r"model\.peft\.peft_scheme='ia3'"):
        dpo_config(tmp_path, "model.peft.peft_scheme=ia3")


# ------------------------------------------------------------------------------------------ PEFT interop
@pytest.mark.parametrize("kind,targets", [("llama_gqa_llama3_rope", ["all"]),
                                          ("qwen2_tied_qkv_bias", ["attention_qkv", "mlp_fc2"]),
                                          ("gpt2", ["c_attn", "c_proj", "c_fc"]),
                                          ("gpt2", ["q_proj", "v_proj", "attention_dense"])])
def test_peft_loads_our_adapters_and_merged_export_matches(hf_checkpoints, tmp_path, kind, targets):
    import peft
    import transformers

    folder, _ = hf_checkpoints[kind]
    ours = load_pretrained(folder).eval()
    apply_lora(ours, LoraConfig(target_modules=targets, adapter_dim=4, alpha=12))
    _randomize_adapters(ours)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.logits(ids)
    save_adapters(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (kind == "gpt2")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(ids).logits - expected).abs().max().item() <= 1e-4
    save_merged(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max().item() <= 1e-4
    restored = load_pretrained(folder).eval()
    load_adapters(restored, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(restored.logits(ids), expected)


def test_restores_adapters_trained_by_peft(hf_checkpoints, tmp_path):
    """Foreign adapters: GPT-2 c_attn with a dense B (split into q/k/v sharing A), llama with rsLoRA and
    per-module rank/alpha patterns."""
    import peft
    import transformers

    cases = {"gpt2": dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16),
             "llama_tied": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, use_rslora=True,
                                rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for kind, settings in cases.items():
        folder, _ = hf_checkpoints[kind]
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_pretrained(folder)
        peft_model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **settings)).eval()
        peft_model.save_pretrained(tmp_path / kind)
        ours = load_pretrained(folder).eval()
        load_adapters(ours, tmp_path / kind)
        with torch.no_grad():
            assert (peft_model(ids).logits - ours.logits(ids)).abs().max().item() <= 1e-4, kind


# ------------------------------------------------------------------------------------------- DPO with LoRA
def _small_data(tmp_path, rows=16):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(open(DEMO_TRAIN).readlines()[:rows]))
    return [f"model.data.data_prefix.train=[{path}]", f"model.data.data_prefix.validation=[{path}]"]


def test_lora_dpo_learns_with_the_base_frozen_and_exports_a_peft_folder(tmp_path):
    import peft

    from nemo_aligner.data.tokenizer import Tokenizer

    run = tmp_path / "run"
    cfg = dpo_config(run, *FAST, *LORA, *_small_data(tmp_path), "trainer.dpo.max_epochs=100",
                     "trainer.dpo.max_steps=12", "model.optim.lr=0.01", "model.optim.sched.min_lr=0.001",
                     "model.optim.sched.warmup_steps=1", "model.optim.sched.max_steps=12")
    assert cfg.model.dpo.ref_mode is None  # resolved to adapter: LoRA on, no explicit choice
    result = run_dpo(cfg)
    assert result["initial_val"]["acc"] == 0 and result["initial_val"]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert result["val"]["acc"] >= 0.7 and result["val"]["loss"] < 0.67
    assert not (run / "ref_logps").exists()  # adapter reference: nothing precomputed

    # the base is bit-exactly the initial one: hf_base (written from the trained model) == a fresh build
    from nemo_aligner.recipes.skeleton import build_model

    fresh = build_model(cfg.model, None, Tokenizer.from_path(run / "hf_base"), torch.device("cpu"))
    trained_base = load_pretrained(run / "hf_base")
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(trained_base.state_dict()[name], tensor), name

    # checkpoints hold only adapters and their optimiser state
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    keys = list(dcp.FileSystemReader(str(latest)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    optim_keys = [k for k in keys if k.startswith("optim.state.")]
    assert model_keys and optim_keys and all(is_adapter_key(k) for k in model_keys + optim_keys)

    # hf/ is a PEFT folder whose base_model_name_or_path resolves: AutoPeftModel reproduces our logits
    ours = load_pretrained(run / "hf_base").eval()
    load_adapters(ours, run / "hf")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids).logits - ours.logits(ids)).abs().max().item() <= 1e-4
    assert (run / "hf/tokenizer.json").is_file()

    # continuing from the exported adapters: the policy starts where the first run ended
    again = dpo_config(tmp_path / "again", *FAST, *LORA, *_small_data(tmp_path), "trainer.dpo.max_steps=1",
                       f"pretrained_checkpoint.restore_from_path={run / 'hf_base'}",
                       f"model.peft.restore_from_path={run / 'hf'}", "model.peft.merge_on_export=true")
    result2 = run_dpo(again)
    assert result2["initial_val"]["loss"] == pytest.approx(result["val"]["loss"], abs=1e-5)
    assert (tmp_path / "again/hf/model.safetensors").is_file()  # merged export: a plain HF model
    assert not (tmp_path / "again/hf/adapter_config.json").exists()


def test_adapter_precompute_and_online_references_give_the_same_losses(tmp_path):
    runs = {}
    for mode in ("adapter", "precompute", "online"):
        run_dpo(dpo_config(tmp_path / mode, *FAST, *LORA, *_small_data(tmp_path), "trainer.dpo.max_steps=2",
                           "trainer.dpo.max_epochs=10", "model.peft.lora_tuning.row_init_method=normal",
                           f"model.dpo.ref_mode={mode}"))
        runs[mode] = [comparable(r) for r in read_metrics(tmp_path / mode)]
    for other in ("precompute", "online"):
        for a, b in zip(runs["adapter"], runs[other]):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (other, a["step"], key)
    # B starts non-zero, so the policy differs from the reference from the first step on
    assert runs["adapter"][0]["train/rewards_all_std"] > 0


def test_resume_with_adapters_continues_the_exact_trajectory(tmp_path):
    common = [*FAST, *LORA, *_small_data(tmp_path), "trainer.dpo.max_epochs=10", "model.optim.sched.max_steps=6",
              "trainer.dpo.save_interval=3", "model.peft.lora_tuning.adapter_dropout=0.1"]
    run_dpo(dpo_config(tmp_path / "straight", *common, "trainer.dpo.max_steps=6"))
    run_dpo(dpo_config(tmp_path / "resumed", *common, "trainer.dpo.max_steps=3"))
    result = run_dpo(dpo_config(tmp_path / "resumed", *common, "trainer.dpo.max_steps=6"))
    assert result["resumed"]
    assert_same_trajectory(read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed"), steps=6)


def test_sft_trains_only_adapters_and_exports_them(tmp_path):
    from nemo_aligner.config import SFTRunConfig
    from nemo_aligner.recipes.sft import run_sft
    from tests.helpers import ROOT

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(open(ROOT / "nemo_aligner/demo/data/sft_train.jsonl").readlines()[:16]))
    cfg = dpo_config(tmp_path / "run", *LORA, "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1",
                     "model.num_attention_heads=2", "model.num_query_groups=1", "model.micro_batch_size=8",
                     "model.global_batch_size=8", "exp_manager.progress_bar=false", "trainer.sft.max_steps=4",
                     "trainer.sft.max_epochs=10", "trainer.sft.val_check_interval=4", "model.optim.lr=0.01",
                     f"model.data.data_prefix.train=[{data}]", f"model.data.data_prefix.validation=[{data}]",
                     yaml=ROOT / "nemo_aligner/conf/gpt_sft.yaml", schema=SFTRunConfig)
    result = run_sft(cfg)
    assert result["val"]["loss"] < result["initial_val"]["loss"]
    assert (tmp_path / "run/hf/adapter_config.json").is_file() and (tmp_path / "run/hf_base/config.json").is_file()
    latest = sorted((tmp_path / "run/checkpoints").glob("step_*"))[-1]
    keys = [k for k in dcp.FileSystemReader(str(latest)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(is_adapter_key(k) for k in keys)


# ----------------------------------------------------------------------------------------- tensor parallel
def _tp_steps(model, ids, labels, tp_mesh=None, sequence_parallel=False, steps=3):
    """Losses of `steps` AdamW steps on the mean token NLL, and the full adapter tensors after them."""
    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.models.heads import ModelWithHead
    from nemo_aligner.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_context
    from nemo_aligner.training.optim import build_optimizer

    module = ModelWithHead(model, LogProbHead(chunk_size=16))
    if tp_mesh is not None:
        apply_tensor_parallel(module, tp_mesh, sequence_parallel)
    optimizer = build_optimizer(module, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98))
    num_tokens = int((labels != -100).sum())
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with vocab_parallel_context(tp_mesh is not None):
            loss = -module(ids, labels=labels).sum() / num_tokens
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return losses, state


def _tp_inputs():
    model = _tiny_model()
    apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=4, alpha=8, row_init_method="normal"))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 8), generator=gen)
    labels = torch.randint(0, 96, (2, 8), generator=gen)
    labels[:, :2] = -100
    return model, ids, labels


def _tp_module_steps(rank, world, port, out_dir):
    """In a worker of `lora_runs`: the module-level tp2 runs (plain and sequence parallel)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        results = {}
        for sp in (False, True):
            model, ids, labels = _tp_inputs()
            results[sp] = _tp_steps(model, ids, labels, mesh["tp"], sequence_parallel=sp)
            attention = model.layers["0"].self_attention
            results[sp] += ({"q_B": tuple(attention.q_proj.lora_B.weight.placements),
                             "o_A": tuple(attention.o_proj.lora_A.weight.placements)},)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "tp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lora_under_tp2_equals_single_process_for_3_steps(lora_runs):
    """The module itself under DTensor tensor parallel: placements, 3 AdamW steps, base untouched."""
    from torch.distributed.tensor import Shard

    model, ids, labels = _tp_inputs()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses, state = _tp_steps(model, ids, labels)
    results = torch.load(lora_runs / "tp.pt", weights_only=True)
    for sp, (tp_losses, tp_state, placements) in results.items():
        assert placements == {"q_B": (Shard(0),), "o_A": (Shard(1),)}
        assert tp_losses == pytest.approx(losses, abs=1e-5), sp
        for name, tensor in state.items():
            assert torch.allclose(tp_state[name], tensor, atol=1e-5), (sp, name)
            if not is_adapter_key(name):
                assert torch.equal(tp_state[name], initial[name]), (sp, name)  # base frozen under TP too
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------ distributed runs (run_dpo, gloo)
# layout -> (overrides, phases). "adapter": ref_mode null (= adapter) and a PEFT-folder export; "merged":
# precomputed reference (with adapters off) and merge_on_export, with sequence parallel.
LORA_LAYOUTS = {
    "tp2": (["model.tensor_model_parallel_size=2"], ("adapter", "merged")),
    "pp2": (["model.pipeline_model_parallel_size=2"], ("adapter",)),
    "dp2": ([], ("adapter",)),
}
LORA_PHASES = {"adapter": [], "merged": ["model.dpo.ref_mode=precompute", "model.peft.merge_on_export=true"]}
SP = {("tp2", "merged"): ["model.sequence_parallel=true"]}


def _lora_run(log_dir, data_dir, world, overrides):
    from tests.test_distributed import tiny_overrides

    return run_dpo(dpo_config(log_dir, *tiny_overrides(data_dir, world), *LORA,
                              "model.peft.lora_tuning.row_init_method=normal", *overrides))


def _lora_worker(rank: int, root: str, ports: dict):
    import torch.distributed as dist

    torch.set_num_threads(1)
    root = Path(root)
    _tp_module_steps(rank, 2, ports["module"], str(root))
    for name, (overrides, phases) in LORA_LAYOUTS.items():
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(ports[name]))
        for phase in phases:
            _lora_run(root / name / phase, root / "data", 2,
                      overrides + LORA_PHASES[phase] + SP.get((name, phase), []))
        if name == "pp2":  # continue from the single-process run's exported adapters, each stage its own layers
            single = root / "single/adapter"
            result = _lora_run(root / name / "restore", root / "data", 2, overrides + [
                f"pretrained_checkpoint.restore_from_path={single / 'hf_base'}",
                f"model.peft.restore_from_path={single / 'hf'}", "trainer.dpo.max_steps=1"])
            if rank == 0:
                (root / name / "restore_initial_val.json").write_text(json.dumps(result["initial_val"]))
        if name == "dp2":  # resume the sharded adapters + optimiser state from step 2, train step 3 again
            if rank == 0:
                shutil.copy(root / name / "adapter/metrics.jsonl", root / name / "straight.jsonl")
                shutil.rmtree(root / name / "adapter/checkpoints/step_00000003")
            dist.barrier()
            assert _lora_run(root / name / "adapter", root / "data", 2, overrides)["resumed"]
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    from tests.helpers import DEMO_VAL

    root = tmp_path_factory.mktemp("lora_distributed")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(open(DEMO_TRAIN).readlines()[:32]))
    (data / "val.jsonl").write_text("".join(open(DEMO_VAL).readlines()[:8]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for phase, overrides in LORA_PHASES.items():
        _lora_run(root / "single" / phase, data, 1, overrides)
    torch.set_num_threads(threads)
    ports = {name: _free_port() for name in [*LORA_LAYOUTS, "module"]}
    mp.spawn(_lora_worker, args=(str(root), ports), nprocs=2, join=True)
    return root


@pytest.mark.parametrize("layout,phase", [(n, p) for n, (_, phases) in LORA_LAYOUTS.items() for p in phases])
def test_lora_dpo_distributed_equals_single_process(lora_runs, layout, phase):
    from safetensors.torch import load_file

    from tests.test_distributed import assert_same_metrics

    want = read_metrics(lora_runs / "single" / phase)
    assert [r["step"] for r in want] == [1, 2, 3] and want[0]["train/rewards_all_std"] > 0
    assert_same_metrics(read_metrics(lora_runs / layout / phase), want, f"LoRA {layout} {phase}")
    files = ["hf/model.safetensors"] if phase == "merged" else ["hf/adapter_model.safetensors",
                                                                  "hf_base/model.safetensors"]
    for file in files:
        got, expected = load_file(lora_runs / layout / phase / file), load_file(lora_runs / "single" / phase / file)
        assert sorted(got) == sorted(expected), file
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=lambda m: f"{file} {name}: {m}")
    if layout == "pp2":  # restored adapters: the policy starts where the single-process run ended
        initial = json.loads((lora_runs / layout / "restore_initial_val.json").read_text())
        assert initial["loss"] == pytest.approx(want[-1]["val/loss"], abs=1e-5)
    if layout == "dp2":
        straight = [json.loads(line) for line in (lora_runs / layout / "straight.jsonl").read_text().splitlines()]
        assert_same_metrics(read_metrics(lora_runs / layout / phase), straight, "LoRA dp2 resumed from step 2")
    if phase == "adapter":
        config = json.loads((lora_runs / layout / phase / "hf/adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((lora_runs / layout / phase / "hf_base").resolve())
