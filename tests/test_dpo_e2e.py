"""DPO end to end through run_dpo and the command line: learning, reference modes, exact resume,
Hugging Face export, NeMo-Aligner command lines, and configuration errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_aligner.config import ConfigError
from nemo_aligner.models.hf import load_pretrained
from nemo_aligner.recipes.dpo import run_dpo
from tests.helpers import FAST, ROOT, assert_same_trajectory, comparable, dpo_config, read_metrics

SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_dpo.py"
NEMO_DPO = ROOT / "tests/data/nemo_aligner_format/dummy-dpo.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo configuration (default model size) for 60 steps."""
    log_dir = tmp_path_factory.mktemp("dpo_run")
    cfg = dpo_config(log_dir, "trainer.dpo.max_steps=60", "trainer.dpo.val_check_interval=20",
                     "exp_manager.progress_bar=false", "model.optim.sched.max_steps=240")
    return log_dir, run_dpo(cfg)


def test_learns_and_writes_every_output(trained):
    log_dir, result = trained
    rows = read_metrics(log_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert result["initial_val"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    val = [r for r in rows if "val/acc" in r]
    assert [r["step"] for r in val] == [20, 40, 60]
    first_loss = sum(r["train/loss"] for r in rows[:10]) / 10
    last_loss = sum(r["train/loss"] for r in rows[-10:]) / 10
    assert last_loss < first_loss - 0.1
    assert val[-1]["val/acc"] >= 0.7 and val[-1]["val/loss"] < 0.6
    for key in ("train/rewards_chosen_mean", "train/rewards_all_std", "train/grad_norm", "train/lr",
                "train/consumed_samples", "train/tokens_per_sec", "val/rewards_margin_mean", "data/truncated_pairs"):
        assert key in rows[-1], key
    assert rows[-1]["train/consumed_samples"] == 60 * 16
    for path in ("tensorboard", "checkpoints", "hf/config.json", "hf/tokenizer.json", "curves.png"):
        assert (log_dir / path).exists(), path


def test_exported_model_loads_in_transformers(trained):
    import transformers

    log_dir, _ = trained
    ours = load_pretrained(log_dir / "hf").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(log_dir / "hf").eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(log_dir / "hf")
    ids = torch.tensor([tok("What color is the banana?")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ids)).abs().max().item() <= 1e-4


def test_precompute_and_online_reference_give_the_same_losses(tmp_path):
    runs = {}
    for mode in ("precompute", "online"):
        run_dpo(dpo_config(tmp_path / mode, *FAST, "trainer.dpo.max_steps=3", f"model.dpo.ref_mode={mode}"))
        runs[mode] = [comparable(r) for r in read_metrics(tmp_path / mode)]
    for a, b in zip(runs["precompute"], runs["online"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert list((tmp_path / "precompute" / "ref_logps").glob("*.safetensors"))
    assert not (tmp_path / "online" / "ref_logps").exists()


def test_resume_continues_the_exact_trajectory(tmp_path):
    common = [*FAST, "model.optim.sched.max_steps=6", "trainer.dpo.save_interval=3"]
    run_dpo(dpo_config(tmp_path / "straight", *common, "trainer.dpo.max_steps=6"))
    run_dpo(dpo_config(tmp_path / "resumed", *common, "trainer.dpo.max_steps=3"))
    result = run_dpo(dpo_config(tmp_path / "resumed", *common, "trainer.dpo.max_steps=6"))
    assert result["resumed"]
    assert_same_trajectory(read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed"), steps=6)


def test_reference_free_loss_skips_the_reference_pass(tmp_path):
    result = run_dpo(dpo_config(tmp_path, *FAST, "trainer.dpo.max_steps=2", "model.dpo.preference_loss=simpo"))
    assert not (tmp_path / "ref_logps").exists()
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["train"]["loss"]))


def test_loss_list_with_weights_and_sft_mixing(tmp_path):
    result = run_dpo(dpo_config(tmp_path, *FAST, "trainer.dpo.max_steps=2", "model.dpo.preference_loss=[dpo,ipo]",
                                "model.dpo.preference_loss_weights=[1.0,0.1]", "model.dpo.sft_loss_weight=0.5"))
    train = result["train"]
    assert train["loss"] == pytest.approx(train["preference_loss"] + 0.5 * train["sft_loss"], rel=1e-5)


def test_bf16_mixed_precision_runs(tmp_path):
    result = run_dpo(dpo_config(tmp_path, *FAST, "trainer.dpo.max_steps=2", "trainer.precision=bf16-mixed"))
    assert torch.isfinite(torch.tensor(result["train"]["loss"]))


def _cli(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_nemo_aligner_command_line_with_a_hugging_face_checkpoint(tmp_path):
    """REFERENCE.md's typical command, only the checkpoint path pointing at a Hugging Face folder."""
    import transformers

    from nemo_aligner.data.tokenizer import Tokenizer

    ckpt = tmp_path / "llama"
    tok = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=tok.vocab_size)
    transformers.LlamaForCausalLM(config).save_pretrained(ckpt)
    tok.save(ckpt)
    out = _cli("trainer.num_nodes=1", "trainer.devices=1", "++model.micro_batch_size=1",
               "++model.global_batch_size=4", f"pretrained_checkpoint.restore_from_path={ckpt}",
               f"model.data.data_prefix={{train: [{NEMO_DPO}], validation: [{NEMO_DPO}], test: [{NEMO_DPO}]}}",
               f"exp_manager.explicit_log_dir={tmp_path / 'results'}", "++trainer.dpo.max_epochs=1",
               "++model.dpo.ref_policy_kl_penalty=0.1", "++trainer.dpo.max_steps=2",
               "++trainer.dpo.limit_val_batches=1", "++exp_manager.progress_bar=false")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done: 2 steps" in out.stdout
    rows = read_metrics(tmp_path / "results")
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "results/hf/config.json").read_text())["model_type"] == "llama"
    # a checkpoint and data: the schema's real defaults, never the demo's toy values
    assert "bundled demo" not in out.stdout
    assert rows[0]["train/lr"] == pytest.approx(9e-6 * 2 / 10)  # lr 9e-6, 10 warmup steps (lr of update 2)
    assert "model.encoder_seq_length=4096 capped at the model's max_position_embeddings=2048" in out.stdout
    assert "warmup_steps=10 >= the run's 2 steps" in out.stdout and "lr by step: step 1: 9e-07" in out.stdout
    assert "test/loss" in rows[-1] and "test/loss" not in rows[0]  # the test split, once at the end


def test_cli_rejects_unknown_keys_and_wrong_types(tmp_path):
    out = _cli("++model.dpo.ref_policy_kl_penaltyy=0.1")
    assert out.returncode != 0 and "unknown config key 'model.dpo.ref_policy_kl_penaltyy'" in out.stderr
    out = _cli("model.micro_batch_size=abc")
    assert out.returncode != 0 and "model.micro_batch_size" in out.stderr


@pytest.mark.parametrize("override,message", [
    ("model.foo=1", r"unknown config key 'model\.foo'; valid keys under 'model': \[.*'micro_batch_size'"),
    ("model.dpo.ref_policy_kl_penalty=abc", r"config key 'model\.dpo\.ref_policy_kl_penalty': Value 'abc'"),
    ("model.data.overlength=cut", r"model\.data\.overlength='cut'; expected one of \['truncate', 'drop', 'error'\]"),
    ("model.dpo.ref_mode=swap", r"model\.dpo\.ref_mode='swap'"),
    ("trainer.dpo.val_check_interval=1.5", r"val_check_interval=1\.5"),
    ("model.dpo.sft_loss_weight=0", None),  # valid alone
])
def test_config_errors_name_the_key(tmp_path, override, message):
    if message is None:
        dpo_config(tmp_path, override)
        return
    with pytest.raises(ConfigError, match=message):
        dpo_config(tmp_path, override)


def test_both_loss_weights_zero_and_bad_loss_name(tmp_path):
    with pytest.raises(ConfigError, match=r"preference_loss_weight and model\.dpo\.sft_loss_weight are both 0"):
        dpo_config(tmp_path, "model.dpo.preference_loss_weight=0", "model.dpo.sft_loss_weight=0")
    cfg = dpo_config(tmp_path, *FAST, "model.dpo.preference_loss=dpoo")
    with pytest.raises(ValueError, match=r"model\.dpo\.preference_loss='dpoo'; expected one of"):
        run_dpo(cfg)


def test_dataset_smaller_than_global_batch(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(NEMO_DPO).readlines()[:3]))
    cfg = dpo_config(tmp_path, *FAST, f"model.data.data_prefix.train=[{small}]")
    with pytest.raises(ValueError, match=r"train data has 3 items but model\.global_batch_size=8"):
        run_dpo(cfg)
