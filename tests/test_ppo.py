"""PPO end to end (recipes.ppo) on tiny models: a transformers-made LlamaForSequenceClassification as the
reward model and the critic's initialisation, scores that rise, kl_coef 0 without any reference pass, the
critic's value read where the policy's log-prob is, a resumed run equal to a straight one, hf/ and critic/
exports that transformers loads, and one clear message for each bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.config import PPORunConfig, load_config
from nemo_aligner.config.presets import with_preset
from tests.helpers import DEMO_DIR, ROOT, read_metrics

PPO_YAML = ROOT / "nemo_aligner/conf/gpt_ppo.yaml"
DEMO_TOKENIZER = ROOT / "nemo_aligner/demo/tokenizer"
PROMPTS = ROOT / "nemo_aligner/demo/data/ppo_prompts_train.jsonl"
VAL_PROMPTS = ROOT / "nemo_aligner/demo/data/ppo_prompts_val.jsonl"

FAST = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.micro_batch_size=8", "model.global_batch_size=16",
    "model.ppo.forward_micro_batch_size=8", "model.ppo.rollout_micro_batch_size=16",
    "model.ppo.length_params.max_length=6", "model.optim.lr=1e-2", "trainer.ppo.limit_val_batches=0",
    "trainer.ppo.max_epochs=10",
    "exp_manager.progress_bar=false", "exp_manager.create_tensorboard_logger=false",
    f"model.data.data_prefix.train=[{PROMPTS}]",
]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """One thread (tiny matmuls only lose from more), no PNG (seconds per run, not what these tests check);
    both put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    yield
    torch.set_num_threads(threads)


def make_hf_reward_model(folder: Path):
    """A random transformers LlamaForSequenceClassification over the demo tokenizer's 400 ids, its head
    scaled up so scores spread over a few units, saved to `folder` with the demo tokenizer beside it."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=400, max_position_embeddings=128, num_labels=1,
                            pad_token_id=0, bos_token_id=1, eos_token_id=4)
    model = tf.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(100.0)
    model.save_pretrained(folder)
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, Path(folder) / f.name)
    return model


@pytest.fixture(scope="module")
def hf_reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_rm")
    return folder, make_hf_reward_model(folder)


def ppo_config(log_dir, rm_folder, *overrides):
    raw = OmegaConf.load(PPO_YAML)
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    overrides = [f"exp_manager.explicit_log_dir={log_dir}", f"reward_model.restore_from_path={rm_folder}", *FAST,
                 *overrides]
    return load_config(with_preset(raw, DEMO_DIR / "gpt_ppo.yaml", overrides), PPORunConfig)


def run(log_dir, rm_folder, *overrides):
    from nemo_aligner.recipes.ppo import run_ppo

    return run_ppo(ppo_config(log_dir, rm_folder, *overrides))


def train_rows(log_dir) -> list[dict]:
    return [r for r in read_metrics(log_dir) if "train/objective/scores" in r]


# ------------------------------------------------------------------------------------------ learning
def test_scores_rise_with_a_transformers_reward_model_and_critic(tmp_path, hf_reward_model):
    import transformers as tf

    folder, hf_model = hf_reward_model
    result = run(tmp_path, folder, "trainer.ppo.max_steps=24", "model.ppo.kl_coef=0.01", "model.ppo.num_ppo_epochs=4",
                 "trainer.ppo.limit_val_batches=1.0", "trainer.ppo.val_check_interval=12", "model.ppo.num_val_samples=16",
                 f"model.data.data_prefix.validation=[{VAL_PROMPTS}]")
    rows = train_rows(tmp_path)
    validated = [r["val/objective/scores"] for r in read_metrics(tmp_path) if "val/objective/scores" in r]
    assert len(validated) == 2  # steps 12 and 24 (before training: metrics of step 0 are not in the file)
    scores = [r["train/objective/scores"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 2.0, scores
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "lr", "grad_norm",
                "time/generation", "time/rewards", "time/old_logps", "time/reference", "time/values",
                "time/policy", "eps"):
        assert f"train/{key}" in rows[-1], key
    # the critic trains: its value loss falls, and critic/ is a LlamaForSequenceClassification folder whose
    # head moved away from the reward model's
    values = [r["train/loss/value_avg"] for r in rows]
    assert sum(values[-3:]) < sum(values[:3]), values
    critic = tf.AutoModelForSequenceClassification.from_pretrained(Path(result["log_dir"]) / "critic").eval()
    assert type(critic).__name__ == "LlamaForSequenceClassification"
    assert not torch.allclose(critic.score.weight, hf_model.score.weight)
    actor = tf.AutoModelForCausalLM.from_pretrained(result["hf_dir"])
    assert actor.config.vocab_size == 400


def test_mini_batches_are_optimiser_steps_of_each_epoch(tmp_path, hf_reward_model, monkeypatch):
    """num_rollout_samples = 2 x global_batch_size: 2 mini-batches, so num_ppo_epochs=3 makes 6 optimiser steps per
    step, each on 16 of the 32 completions (a seeded shuffle of the rollout, then contiguous parts)."""
    from nemo_aligner.training.loop import Trainer

    sizes = []
    original = Trainer._update
    monkeypatch.setattr(Trainer, "_update", lambda self, batches: sizes.append(sum(b.num_examples for b in batches))
                        or original(self, batches))
    run(tmp_path, hf_reward_model[0], "trainer.ppo.max_steps=1", "model.ppo.num_rollout_samples=32",
        "model.ppo.num_ppo_epochs=3", "exp_manager.create_checkpoint_callback=false")
    assert sizes == [16] * 6
    assert train_rows(tmp_path)[0]["train/consumed_samples"] == 32


def test_kl_coef_zero_runs_no_reference_pass(tmp_path, hf_reward_model, monkeypatch):
    from nemo_aligner.rollout import RolloutReference

    calls = []
    original = RolloutReference.fill
    monkeypatch.setattr(RolloutReference, "fill", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    run(tmp_path / "kl0", hf_reward_model[0], "trainer.ppo.max_steps=1", "model.ppo.kl_coef=0",
        "model.ppo.num_ppo_epochs=1", "exp_manager.create_checkpoint_callback=false")
    row = train_rows(tmp_path / "kl0")[0]
    assert calls == [] and "train/time/reference" not in row and row["train/objective/kl"] == 0.0
    # one pass over one mini-batch: the old log-probs are the training forward's own, so the ratio is 1
    assert row["train/val/ratio"] == pytest.approx(1.0, abs=1e-6) and row["train/policy/approxkl_avg"] < 1e-10
    assert row["train/policy/clipfrac_avg"] == 0.0
    run(tmp_path / "kl", hf_reward_model[0], "trainer.ppo.max_steps=1", "model.ppo.kl_coef=0.05",
        "exp_manager.create_checkpoint_callback=false")
    assert calls == [1] and "train/time/reference" in train_rows(tmp_path / "kl")[0]


# ------------------------------------------------------------------------------------------ the critic's values
def test_critic_value_of_a_token_is_read_where_its_log_prob_is(hf_reward_model):
    """values[s, t] = the score head at position P + t - 1 of prompt + completion (the state token t is
    chosen in), for padded and packed rows alike."""
    from nemo_aligner.models.hf import load_pretrained
    from nemo_aligner.models.score import SEQUENCE_CLASSIFICATION, ScoreHead
    from nemo_aligner.models.heads import ModelWithHead
    from nemo_aligner.rollout import RolloutDataset, RolloutExample, collate_rollout, per_sequence
    import numpy as np

    model = load_pretrained(hf_reward_model[0], task=SEQUENCE_CLASSIFICATION).eval()
    prompts, completions = [[1, 7, 9], [1, 12]], [[20, 21, 4], [30, 31, 32, 33]]
    examples = [RolloutExample(np.array(p), np.array(c), "", "", {}, i, 0, False, np.zeros(len(c), np.float32))
                for i, (p, c) in enumerate(zip(prompts, completions))]
    dataset = RolloutDataset(examples)
    module = ModelWithHead(model, ScoreHead())
    for packed in (False, True):
        batch = collate_rollout(dataset, [0, 1], pad_id=0, packed=packed)
        with torch.no_grad():
            values_SL, mask_SL = per_sequence(module(batch.input_ids, labels=batch.labels,
                                                     segment_ids=batch.segment_ids), batch)
        for s, (p, c) in enumerate(zip(prompts, completions)):
            full = model.logits(torch.tensor([p + c]))[0]
            assert torch.allclose(values_SL[s, :len(c)], full[len(p) - 1:len(p) + len(c) - 1], atol=1e-5)
            assert mask_SL[s].sum() == len(c)


# ------------------------------------------------------------------------------------------ resume
def test_resume_continues_the_exact_trajectory(tmp_path, hf_reward_model):
    folder = hf_reward_model[0]
    common = ["trainer.ppo.max_steps=4", "trainer.ppo.save_interval=2", "model.ppo.kl_coef=0.05",
              "exp_manager.checkpoint_callback_params.save_top_k=-1"]
    run(tmp_path / "straight", folder, *common)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("step_00000004*"))
    metrics = (tmp_path / "resumed/metrics.jsonl")
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]))
    (tmp_path / "resumed/finished.json").unlink()
    shutil.rmtree(tmp_path / "resumed/hf")
    shutil.rmtree(tmp_path / "resumed/critic")
    result = run(tmp_path / "resumed", folder, *common)
    assert result["resumed"]
    straight, resumed = train_rows(tmp_path / "straight"), train_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    skip = ("time/", "tokens_per_sec", "step_time", "train/eps")
    for a, b in zip(straight[2:], resumed[2:]):
        for key, value in a.items():
            if not any(s in key for s in skip):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides,message", [
    (["model.ppo.num_rollout_samples=24"], "model.ppo.num_rollout_samples=24 is not a multiple of model.global_batch_size=16"),
    (["model.ppo.num_rollout_samples=32", "model.ppo.num_mini_batches=4"], "model.ppo.num_mini_batches=4"),
    (["model.ppo.kl_estimator=k2"], "model.ppo.kl_estimator"),
    (["model.ppo.sampling_params.use_greedy=true"], "model.ppo.sampling_params.use_greedy"),
    (["trainer.ppo.initial_policy_kl_penalty=-1"], "trainer.ppo.initial_policy_kl_penalty"),
    (["model.ppo.cliprange=1.5"], "model.ppo.cliprange"),
])
def test_bad_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ppo_config(tmp_path, "rm", *overrides)


def test_bad_inputs_are_one_message_naming_the_key(tmp_path, hf_reward_model):
    from nemo_aligner.recipes.ppo import run_ppo

    cfg = ppo_config(tmp_path / "a", hf_reward_model[0])
    cfg.reward_model.restore_from_path = None
    with pytest.raises(ValueError, match="reward_model.restore_from_path is not set"):
        run_ppo(cfg)
    with pytest.raises(ValueError, match=f"reward_model.restore_from_path={tmp_path}/missing: not found"):
        run(tmp_path / "b", tmp_path / "missing")
    other = tmp_path / "other_tokenizer"
    shutil.copytree(hf_reward_model[0], other)
    config = json.loads((other / "tokenizer.json").read_text())
    config["model"]["vocab"] = {k: (v + 1) % len(config["model"]["vocab"]) for k, v in config["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="critic.restore_from_path=.*other_tokenizer: its tokenizer differs"):
        run(tmp_path / "c", hf_reward_model[0], f"critic.restore_from_path={other}")
    adapters = tmp_path / "adapters"
    shutil.copytree(hf_reward_model[0], adapters)
    (adapters / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="critic.restore_from_path=.*adapters: a PEFT adapter folder"):
        run(tmp_path / "d", hf_reward_model[0], f"critic.restore_from_path={adapters}")


def test_every_ppo_key_is_documented_in_the_schema():
    from nemo_aligner.config.describe import describe

    keys = {k.name: k for k in describe(PPORunConfig)}
    for name in ("model.ppo.num_rollout_samples", "model.ppo.ratio_eps", "model.ppo.kl_coef",
                 "model.ppo.sampling_params.end_strings", "model.ppo.length_params.max_length",
                 "trainer.ppo.initial_policy_kl_penalty", "reward_model.restore_from_path", "critic.restore_from_path"):
        assert keys[name].doc, name
    undocumented = [k for k, v in keys.items() if k.startswith(("model.ppo.", "trainer.ppo.")) and not v.doc]
    assert not undocumented, undocumented


def test_lora_actor_uses_the_adapters_off_reference(tmp_path, hf_reward_model):
    """With LoRA the reference is the policy with its adapters off (no copy): KL 0 at step 1 (B = 0), > 0 once
    the adapters moved; hf/ is a PEFT adapter folder, critic/ a full model."""
    result = run(tmp_path, hf_reward_model[0], "trainer.ppo.max_steps=2", "model.ppo.kl_coef=0.05",
                 "model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4",
                 "exp_manager.create_checkpoint_callback=false")
    rows = train_rows(tmp_path)
    assert rows[0]["train/objective/kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["train/objective/kl"] != 0.0
    assert (Path(result["hf_dir"]) / "adapter_config.json").is_file()
    assert (tmp_path / "critic/model.safetensors").is_file() and not (tmp_path / "critic/adapter_config.json").exists()


def test_entry_script_reports_a_bad_key_in_one_line(tmp_path):
    """train_gpt_ppo.py checks the config before anything runs (the demo's reward model is not trained first)."""
    import os
    import subprocess
    import sys

    script = ROOT / "examples/nlp/gpt/train_gpt_ppo.py"
    out = subprocess.run([sys.executable, str(script), "model.ppo.num_rollout_samples=24", "model.global_batch_size=16",
                          f"exp_manager.explicit_log_dir={tmp_path}/run"], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == ["config error: model.ppo.num_rollout_samples=24 is not a multiple of model.global_batch_size=16 "
                     "(the mini-batch of one optimiser step)"], out.stderr
    assert not (tmp_path / "results").exists()


def test_offload_moves_frozen_models_in_for_their_pass_only_and_is_a_no_op_on_cpu(tmp_path, hf_reward_model,
                                                                                   monkeypatch):
    """model.ppo.offload_*: on a CPU run the trajectory is the same as without (nothing moves); the moves
    themselves (recorded) bring the reward model and the reference in for their pass and out after it, and the
    optimiser's state out for each rollout and back."""
    import nemo_aligner.models.offload as offload
    import nemo_aligner.training.optim as optim

    offload_keys = ["model.ppo.offload_adam_states=true", "model.ppo.offload_reference=true",
                    "model.ppo.offload_reward_model=true"]
    common = [*FAST, "trainer.ppo.max_steps=2", "model.ppo.kl_coef=0.05"]
    run(tmp_path / "plain", hf_reward_model[0], *common)
    run(tmp_path / "offload", hf_reward_model[0], *common, *offload_keys)
    plain, moved = train_rows(tmp_path / "plain"), train_rows(tmp_path / "offload")
    math_keys = ("train/loss", "train/objective", "train/policy", "train/val/", "train/grad_norm")  # not timings
    same = [[{k: v for k, v in r.items() if k.startswith(math_keys)} for r in rows] for rows in (plain, moved)]
    assert len(plain) == 2 and len(same[0][0]) > 10 and same[0] == same[1]

    calls = []
    monkeypatch.setattr(offload, "move_module", lambda module, device: calls.append(("module", str(device))))
    with offload.resident(torch.nn.Linear(2, 2), "cuda"):
        calls.append(("inside", ""))
    assert calls == [("module", "cuda"), ("inside", ""), ("module", "cpu")]
    calls.clear()
    with pytest.raises(RuntimeError), offload.resident(torch.nn.Linear(2, 2), "cuda"):
        raise RuntimeError("a failing pass still moves the model out")
    assert calls == [("module", "cuda"), ("module", "cpu")]
    calls.clear()
    with offload.resident(torch.nn.Linear(2, 2), "cpu"):  # a CPU run: nothing moves
        pass
    assert calls == []
    monkeypatch.setattr(optim, "move_optimizer_state", lambda opt, device: calls.append(("state", str(device))))
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with optim.optimizer_state_on(opt, "meta"):
        calls.append(("inside", ""))
    assert calls == [("state", "meta"), ("inside", ""), ("state", "cpu")]
