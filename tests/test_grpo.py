"""GRPO end to end on the demo's toy task (tiny model, CPU): every loss type and estimator wired through
the recipe, degenerate groups (equal rewards, all truncated), the reward rising, no reference pass at
beta=0, rollouts reused by num_iterations, clear reward-function errors, exact resume, and the
online-RL pieces (rollout collation padded vs packed, the policy head) against direct computations."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.config import GRPORunConfig, load_config
from nemo_aligner.config.presets import with_preset
from nemo_aligner.losses.policy import PolicyHead, token_logprobs_and_entropy
from nemo_aligner.rewards import RewardError
from nemo_aligner.rollout import RolloutDataset, RolloutExample, collate_rollout, per_sequence

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "examples/nlp/gpt/conf/gpt_grpo.yaml"
DEMO = ROOT / "examples/nlp/gpt/conf/demo/gpt_grpo.yaml"
FAST = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
        "model.num_query_groups=1", "model.micro_batch_size=8", "model.global_batch_size=16",
        "model.grpo.num_generations=4", "model.grpo.max_completion_length=3", "trainer.grpo.max_steps=2",
        "trainer.grpo.limit_val_batches=0", "exp_manager.progress_bar=false",
        "exp_manager.create_tensorboard_logger=false"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)


def grpo_config(log_dir, *overrides, fast=True):
    raw = OmegaConf.load(YAML)
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    overrides = [f"exp_manager.explicit_log_dir={log_dir}", *(FAST if fast else []), *overrides]
    return load_config(with_preset(raw, DEMO, overrides), GRPORunConfig)


def run(log_dir, *overrides, fast=True):
    from nemo_aligner.recipes.grpo import run_grpo

    return run_grpo(grpo_config(log_dir, *overrides, fast=fast))


def metrics(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the online-RL pieces
def _rollout(lengths=((3, 2), (2, 4), (4, 1))) -> RolloutDataset:
    g = torch.Generator().manual_seed(0)
    examples = []
    for k, (p, c) in enumerate(lengths):
        examples.append(RolloutExample(
            prompt_ids=torch.randint(3, 50, (p,), generator=g).numpy(),
            completion_ids=torch.randint(3, 50, (c,), generator=g).numpy(), prompt="p", text="t", columns={},
            prompt_index=k, sample_index=0, truncated=False, sampler_logps=torch.zeros(c).numpy(),
            ref_logps=torch.randn(c, generator=g).numpy(), advantage=float(k)))
    return RolloutDataset(examples)


def test_rollout_collation_padded_and_packed_give_the_same_completions():
    torch.manual_seed(0)
    dataset = _rollout()
    padded = collate_rollout(dataset, [0, 1, 2], pad_id=0)
    packed = collate_rollout(dataset, [0, 1, 2], pad_id=0, packed=True, pack_size=10)
    assert packed.input_ids.shape[0] == 2 and packed.example_indices.tolist() == [0, 2, 1]  # 0 and 2 share a row
    for batch in (padded, packed):
        ids_SL, mask_SL = per_sequence(batch.labels, batch)
        order = batch.example_indices.tolist()
        for s, i in enumerate(order):
            want = dataset.examples[i].completion_ids.tolist()
            assert ids_SL[s][mask_SL[s]].tolist() == want
            assert batch.ref_logps_SL[s, :len(want)].tolist() == pytest.approx(dataset.examples[i].ref_logps.tolist())
            assert float(batch.advantages_S[s]) == dataset.examples[i].advantage


def test_policy_head_matches_the_chunked_functions():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 10]])
    out = PolicyHead(chunk_size=2, temperature=0.7)(hidden, weight, labels)
    scored = labels != -100
    logps, entropy = token_logprobs_and_entropy(hidden[scored], weight, labels[scored], temperature=0.7)
    logits = (hidden[scored] @ weight.T) / 0.7
    assert torch.allclose(out[scored][:, 0], torch.log_softmax(logits, -1).gather(1, labels[scored][:, None])[:, 0],
                          atol=1e-6)
    assert torch.allclose(out[scored][:, 1], entropy, atol=1e-6)
    assert torch.allclose(out[scored][:, 1], torch.distributions.Categorical(logits=logits).entropy(), atol=1e-5)
    assert (out[~scored] == 0).all()


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("loss_type,estimator,level,extra", [
    ("dapo", "grpo", "token", []),
    ("grpo", "rloo", "token", ["model.grpo.scale_rewards=batch"]),
    ("dr_grpo", "reinforce_plus_plus", "token", []),
    ("bnpo", "grpo", "sequence", ["model.grpo.delta=1.5", "model.grpo.epsilon_high=0.28"]),
])
def test_every_loss_type_and_estimator_trains(tmp_path, loss_type, estimator, level, extra):
    run(tmp_path, f"model.grpo.loss_type={loss_type}", f"model.grpo.advantage_estimator={estimator}",
        f"model.grpo.importance_sampling_level={level}", *extra)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio", "grad_norm",
                "rewards/accuracy/mean", "rewards/says_a_colour/mean", "time/generation", "time/policy",
                "tokens_per_sec/generation", "tokens_per_sec/policy"):
        assert math.isfinite(rows[-1][f"train/{key}"]), key
    assert rows[-1]["train/grad_norm"] > 0  # some group has unequal rewards or the loss is not wired


def _constant_reward_file(tmp_path, body="return [1.0] * len(completions)") -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(f"def reward(prompts, completions, completion_ids, **columns):\n    {body}\n")
    return f"{path}:reward"


def test_equal_rewards_give_zero_advantages_and_no_nan(tmp_path):
    spec = _constant_reward_file(tmp_path)
    run(tmp_path / "run", f"model.grpo.reward_funcs=[{spec}]", "model.grpo.reward_weights=null")
    row = metrics(tmp_path / "run")[-1]
    assert row["train/frac_reward_zero_std"] == 1.0 and row["train/reward_std"] == 0.0
    assert row["train/loss"] == 0.0 and row["train/grad_norm"] == 0.0


def test_all_truncated_groups_with_mask_truncated_completions_get_no_loss(tmp_path):
    # one token from the untrained model is (for these seeds) never EOS: every completion is cut at the limit
    run(tmp_path, "model.grpo.mask_truncated_completions=true", "model.grpo.loss_type=grpo",
        "model.grpo.max_completion_length=1")
    row = metrics(tmp_path)[-1]
    assert row["train/completions/clipped_ratio"] == 1.0
    assert row["train/loss"] == 0.0 and row["train/grad_norm"] == 0.0 and math.isfinite(row["train/entropy"])


def test_reward_rises_on_the_toy_task(tmp_path):
    run(tmp_path, "trainer.grpo.max_steps=30", "model.global_batch_size=64", "model.micro_batch_size=64",
        "model.grpo.num_generations=8", "model.grpo.max_completion_length=4", "model.optim.lr=3e-3", fast=False)
    rows = metrics(tmp_path)
    first = sum(r["train/reward"] for r in rows[:5]) / 5
    last = sum(r["train/reward"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)


def test_beta_zero_runs_no_reference_pass_and_beta_positive_does(tmp_path, monkeypatch):
    from nemo_aligner.rollout import RolloutReference

    calls = []
    fill = RolloutReference.fill
    monkeypatch.setattr(RolloutReference, "fill", lambda self, *a, **k: (calls.append(1), fill(self, *a, **k))[1])
    run(tmp_path / "beta0")
    assert calls == [] and "train/time/reference" not in metrics(tmp_path / "beta0")[-1]
    assert "train/kl" not in metrics(tmp_path / "beta0")[-1]
    run(tmp_path / "beta", "model.grpo.beta=0.04")
    row = metrics(tmp_path / "beta")[-1]
    assert len(calls) == 2 and row["train/time/reference"] > 0
    assert row["train/kl"] >= 0 and math.isfinite(row["train/kl"])


def test_num_iterations_reuses_each_rollout(tmp_path, monkeypatch):
    from nemo_aligner.generation.sampler import Sampler
    from nemo_aligner.training.loop import Trainer

    generations, updates = [], []
    generate, update = Sampler.generate, Trainer._update
    monkeypatch.setattr(Sampler, "generate", lambda self, *a, **k: (generations.append(1), generate(self, *a, **k))[1])
    monkeypatch.setattr(Trainer, "_update", lambda self, b: (updates.append(1), update(self, b))[1])
    run(tmp_path, "model.grpo.num_iterations=2", "model.optim.lr=3e-2")
    assert len(generations) == 2 and len(updates) == 4
    # the second pass of a rollout sees a moved policy against the recorded old log-probs: ratios leave 1
    rows = metrics(tmp_path)
    assert all(math.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.parametrize("body,expected", [
    ("raise RuntimeError('boom')", "raised RuntimeError: boom (at my_rewards.py:2) on sample 0"),
    ("return [1.0] * (len(completions) - 1)", "returned 15 rewards for 16 completions"),
    ("return [float('nan')] * len(completions)", "returned nan for sample 0"),
])
def test_a_bad_reward_function_stops_the_run_naming_it(tmp_path, body, expected):
    spec = _constant_reward_file(tmp_path, body)
    with pytest.raises(RewardError, match="reward function 'reward'") as err:
        run(tmp_path / "run", f"model.grpo.reward_funcs=[{spec}]", "model.grpo.reward_weights=null")
    assert expected in str(err.value) and "my_rewards.py" in str(err.value)


def test_resume_continues_the_exact_trajectory(tmp_path):
    steps = ["trainer.grpo.max_steps=4", "trainer.grpo.save_interval=2",
             "exp_manager.checkpoint_callback_params.save_top_k=-1"]
    run(tmp_path / "straight", *steps)
    run(tmp_path / "resumed", "trainer.grpo.max_steps=2", "model.optim.sched.max_steps=4", *steps[1:])
    result = run(tmp_path / "resumed", *steps)
    assert result["resumed"]
    timing = ("time/", "tokens_per_sec", "step_time")
    want = [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in metrics(tmp_path / "straight")]
    got = [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in metrics(tmp_path / "resumed")]
    assert got[-2:] == want[-2:]


def test_global_batch_must_hold_whole_groups(tmp_path):
    with pytest.raises(ValueError, match="model.global_batch_size=10 counts completions and must be a multiple of "
                                         "model.grpo.num_generations=4"):
        grpo_config(tmp_path, "model.global_batch_size=10", "model.micro_batch_size=2")


def test_a_reward_model_is_one_more_reward_scored_as_transformers_scores(tmp_path):
    import transformers as tf

    from nemo_aligner.data.tokenizer import Tokenizer
    from nemo_aligner.generation import prompt_token_ids

    tokenizer = Tokenizer.from_path(ROOT / "examples/demo/tokenizer")
    config = tf.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                            pad_token_id=tokenizer.pad_id, max_position_embeddings=128)
    torch.manual_seed(3)
    hf = tf.LlamaForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path / "rm")
    run(tmp_path / "run", f"model.grpo.reward_model_path={tmp_path / 'rm'}", "model.grpo.reward_weights=[1.0, 0.25, 2.0]",
        "model.grpo.log_rollouts=true", "trainer.grpo.max_steps=1")
    row = metrics(tmp_path / "run")[-1]
    assert math.isfinite(row["train/rewards/reward_model/mean"])
    records = [json.loads(line) for line in (tmp_path / "run/rollouts.jsonl").read_text().splitlines()]
    assert len(records) == 16
    for record in records[:4]:
        ids = prompt_token_ids(record["prompt"], tokenizer) + record["completion_ids"]
        with torch.no_grad():
            want = float(hf(torch.tensor([ids])).logits[0, 0])
        got = record["rewards"]["reward_model"]
        assert got == pytest.approx(want, abs=1e-4)
        combined = record["rewards"]["accuracy"] + 0.25 * record["rewards"]["says_a_colour"] + 2.0 * got
        assert record["reward"] == pytest.approx(combined, abs=1e-5)


def test_neither_reward_functions_nor_a_reward_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="model.grpo.reward_funcs is empty and there is no reward model"):
        run(tmp_path, "model.grpo.reward_funcs=[]", "model.grpo.reward_weights=null")


def test_the_schema_holds_trls_defaults_and_the_yaml_changes_none():
    raw = OmegaConf.load(YAML)
    raw.pop("defaults"), raw.pop("hydra")
    cfg = load_config(raw, GRPORunConfig)
    g, optim = cfg.model.grpo, cfg.model.optim
    assert (g.num_generations, g.max_prompt_length, g.max_completion_length, g.temperature, g.loss_type, g.epsilon,
            g.beta, g.num_iterations, g.advantage_estimator, g.resolved_scale_rewards) == (
        8, 512, 512, 1.0, "dapo", 0.2, 0.0, 1, "grpo", "group")
    assert (optim.lr, optim.weight_decay, list(optim.betas), optim.sched.name) == (1e-6, 0.0, [0.9, 0.999], "constant")
    assert cfg.exp_manager.checkpoint_callback_params.monitor == "val_reward"


def test_the_entry_script_runs_the_demo_and_names_a_bad_key(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "examples/nlp/gpt/train_gpt_grpo.py")
    done = subprocess.run([sys.executable, script, "trainer.grpo.max_steps=2", "trainer.grpo.limit_val_batches=2",
                           f"exp_manager.explicit_log_dir={tmp_path / 'demo'}", "exp_manager.progress_bar=false",
                           "exp_manager.create_tensorboard_logger=false"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "running the bundled demo" in done.stdout and (tmp_path / "demo/hf/config.json").is_file()
    assert "val/reward" in metrics(tmp_path / "demo")[-1]
    bad = subprocess.run([sys.executable, script, "model.grpo.loss_typo=dapo", f"exp_manager.explicit_log_dir={tmp_path}"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "loss_typo" in bad.stderr and "Traceback" not in bad.stderr


def test_packed_rollouts_train_as_padded_ones(tmp_path):
    steps = ["trainer.grpo.max_steps=2", "model.optim.lr=1e-2", "model.grpo.beta=0.04"]
    run(tmp_path / "padded", *steps)
    run(tmp_path / "packed", *steps, "model.data.packing=true", "model.data.pack_size=64")
    keep = ("loss", "reward", "kl", "entropy", "grad_norm", "completions/mean_length")
    for p, q in zip(metrics(tmp_path / "padded"), metrics(tmp_path / "packed")):
        for key in keep:
            assert q[f"train/{key}"] == pytest.approx(p[f"train/{key}"], rel=1e-4, abs=1e-6), key


def test_with_lora_the_reference_is_the_policy_with_adapters_off(tmp_path):
    run(tmp_path, "model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4", "model.grpo.beta=0.04",
        "model.optim.lr=5e-2", "trainer.grpo.max_steps=3")
    rows = metrics(tmp_path)
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-9)  # adapters start at zero: policy == reference
    assert rows[-1]["train/kl"] > 0 and (tmp_path / "hf/adapter_config.json").is_file()


def test_validation_samples_work_on_prompt_data(tmp_path):
    run(tmp_path, "trainer.grpo.limit_val_batches=1", "exp_manager.val_samples.num_prompts=2",
        "exp_manager.val_samples.max_new_tokens=3")
    assert "val/reward" in metrics(tmp_path)[-1]
    samples = [json.loads(line) for line in (tmp_path / "val_samples.jsonl").read_text().splitlines()]
    assert samples and "color" in json.dumps(samples[0])


def test_mini_batches_split_each_pass_into_optimiser_steps(tmp_path, monkeypatch):
    from nemo_aligner.algorithms.grpo import GRPOAlgorithm
    from nemo_aligner.training.loop import Trainer

    updates, update = [], Trainer._update
    monkeypatch.setattr(GRPOAlgorithm, "num_mini_batches", 2, raising=False)  # PPO's num_mini_batches
    monkeypatch.setattr(Trainer, "_update", lambda self, b: (updates.append(sum(x.num_sequences for x in b)),
                                                             update(self, b))[1])
    run(tmp_path, "model.grpo.num_iterations=2", "model.micro_batch_size=4")
    assert updates == [8, 8, 8, 8] * 2  # 2 steps x 2 passes x 2 mini-batches of 8 completions
