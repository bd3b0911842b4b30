"""Reward models: the Bradley-Terry loss against TRL's formula, the data formats (every DPO row shape,
NeMo-Aligner comparison files, NeMo-RL rows) and their errors, the score position in padded and packed
rows, packed == padded (loss and gradients), and the recipe end to end (the demo learns, exact resume,
LoRA, the Hugging Face export, the command line)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nemo_aligner.algorithms.rm import RewardModelAlgorithm, RewardSettings
from nemo_aligner.config import ConfigError, RMRunConfig
from nemo_aligner.data.dataset import TokenizeSettings
from nemo_aligner.data.preference.reward import collate_reward_pairs, reward_pairs_from_files
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.scores import layout_scored, score_position
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.losses.reward import reward_loss
from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.heads import ModelWithHead
from nemo_aligner.models.score import ScoreModel
from tests.helpers import DEMO_TRAIN, DEMO_VAL, ROOT, compose, comparable, read_metrics

RM_YAML = ROOT / "nemo_aligner/conf/training_rm.yaml"
SCRIPT = ROOT / "examples/nlp/gpt/train_reward_model.py"
MSGS = [{"role": "user", "content": "What color is the sky?"}]
FAST = ["exp_manager.progress_bar=false", "exp_manager.create_tensorboard_logger=false",
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
        "model.num_query_groups=1", "model.micro_batch_size=4", "model.global_batch_size=8",
        f"model.data.data_prefix.train=[{DEMO_TRAIN}]", f"model.data.data_prefix.validation=[{DEMO_VAL}]",
        "trainer.rm.limit_val_batches=2", "model.encoder_seq_length=96"]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Tiny models lose from intra-op threads on shared cores; the PNG of the curves is not checked here."""
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")


def rm_config(log_dir, *overrides):
    return compose(RM_YAML, RMRunConfig, log_dir, *overrides)


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs(tmp_path, tok, rows, name="d.jsonl", **settings):
    settings = TokenizeSettings(**{"seq_length": 64, "add_bos": False, **settings})
    return reward_pairs_from_files([write_rows(tmp_path / name, rows)], tok, settings)


# ------------------------------------------------------------------------------------------------ the loss
def test_ranking_loss_is_trls_with_margin_and_centering():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected, margin = (torch.randn(6, generator=generator) for _ in range(3))
    c = 0.01
    trl = -F.logsigmoid(chosen - rejected - margin).mean() + c * torch.mean((chosen + rejected) ** 2)
    ours = reward_loss("binary_ranking", chosen, rejected, margin, center_rewards_coefficient=c)
    assert ours.shape == (6,)
    torch.testing.assert_close(ours.mean(), trl)
    one = reward_loss("binary_ranking", torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.5]))
    assert one.item() == pytest.approx(math.log1p(math.exp(-1.0)))  # -log sigma(2 - 0.5 - 0.5), by hand
    assert reward_loss("binary_ranking", chosen, rejected).mean().item() == pytest.approx(
        -F.logsigmoid(chosen - rejected).mean().item())


def test_loss_is_normalised_by_the_pairs_of_the_global_batch(tok, tmp_path):
    dataset = pairs(tmp_path, tok, [{"prompt": MSGS, "chosen": [{"role": "assistant", "content": f"Blue {i}."}],
                                     "rejected": [{"role": "assistant", "content": "Red."}]} for i in range(4)])
    algorithm = RewardModelAlgorithm(RewardSettings(), tok.pad_id)
    batch = algorithm.make_batch(dataset, [0, 1], packed=False)
    scores = torch.zeros(batch.input_ids.shape)
    loss, sums = algorithm.loss(batch, scores, num_pairs_global=8)  # equal scores: log 2 per pair
    assert loss.item() == pytest.approx(2 * math.log(2) / 8) and sums["acc"].item() == 0.0


# ------------------------------------------------------------------------------------------------ data
def test_every_dpo_row_shape_comparison_files_and_nemo_rl_rows_become_pairs(tmp_path, tok):
    chosen, rejected = "The sky is blue.", "The sky is green."
    rows = [
        {"prompt": "Q: sky?\nA: ", "chosen_response": chosen, "rejected_response": rejected, "margin": 1.5},
        {"prompt": MSGS, "chosen": [{"role": "assistant", "content": chosen}],
         "rejected": [{"role": "assistant", "content": rejected}]},
        {"chosen": MSGS + [{"role": "assistant", "content": chosen}],
         "rejected": MSGS + [{"role": "assistant", "content": rejected}]},
        # NeMo-RL: the lower rank is preferred, whatever the order in the list
        {"context": MSGS, "completions": [{"rank": 1, "completion": [{"role": "assistant", "content": rejected}]},
                                          {"rank": 0, "completion": [{"role": "assistant", "content": chosen}]}]},
    ]
    dataset = pairs(tmp_path, tok, rows)
    assert dict(dataset.report.shapes) == {"nemo_legacy": 1, "trl_conversational": 1, "trl_implicit_prompt": 1,
                                           "nemo_rl": 1}
    assert [p.margin for p in dataset.pairs] == [1.5, None, None, None]
    for pair in dataset.pairs[1:]:  # the same conversation, whichever the row shape
        assert np.array_equal(pair.chosen, dataset.pairs[1].chosen)
        assert tok.decode(pair.chosen).startswith(chosen) and tok.decode(pair.rejected).startswith(rejected)
    # NeMo-Aligner comparison file: a chosen line then its rejected line; each text tokenised whole
    comparison = pairs(tmp_path, tok, [{"text": "Q: sky? A: " + chosen}, {"text": "Q: sky? A: " + rejected},
                                       {"text": "Q: grass? A: green"}, {"text": "Q: grass? A: red"}], name="c.jsonl")
    assert len(comparison) == 2 and comparison.report.shapes == {"nemo_comparison": 2}
    first = comparison.pairs[0]
    assert len(first.prompt) == 0 and list(first.chosen) == tok.encode("Q: sky? A: " + chosen) + [tok.eos_id]
    collated = collate_reward_pairs(dataset, [0, 1], tok.pad_id, packed=False)
    assert collated.margins.tolist() == [1.5, 0.0]


@pytest.mark.parametrize("rows,message", [
    ([{"text": "a"}, {"text": "b"}, {"text": "c"}], r"c\.jsonl: 3 lines, an odd number.*line 3 has no rejected partner"),
    ([{"text": "a"}, {"txt": "b"}], r"c\.jsonl:2: missing key 'text'"),
    ([{"text": "same answer"}, {"text": "same answer"}], r"c\.jsonl:1-2: chosen and rejected are identical"),
    (["", {"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": "A", "rejected": "A"}],
     r"c\.jsonl:3: chosen and rejected are identical"),
    ([{"context": MSGS, "completions": [{"rank": 0, "completion": "x"}, {"rank": 0, "completion": "y"}]}],
     r"c\.jsonl:1: both completions have rank 0"),
    ([{"context": MSGS, "completions": [{"rank": i, "completion": "x"} for i in range(3)]}],
     r"c\.jsonl:1: 'completions' holds 3 entries; pairs are supported"),
    ([{"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"}], r"c\.jsonl:1: margin must be a number"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, tok, rows, message):
    with pytest.raises(DataError, match=message):
        pairs(tmp_path, tok, rows, name="c.jsonl")


def test_identical_after_truncation_says_so(tmp_path, tok):
    rows = [{"prompt": "Q", "chosen": "word " * 40 + "yes", "rejected": "word " * 40 + "no"}]
    with pytest.raises(DataError, match=r"identical after truncation to seq_length=16 .*overlength=drop"):
        pairs(tmp_path, tok, rows, seq_length=16)
    assert len(pairs(tmp_path, tok, rows + [{"prompt": "Q", "chosen": "A", "rejected": "B"}], seq_length=16,
                     overlength="drop")) == 1


# ------------------------------------------------------------------------------------------------ layout
def test_the_score_position_is_each_sequences_last_non_pad_token_padded_or_packed():
    pad = 0
    a, b, c = np.array([5, 6, 7]), np.array([8, 9, pad]), np.array([pad])  # b ends in the pad id (pad == eos)
    assert [score_position(s, pad) for s in (a, b, c)] == [2, 1, 0]
    padded = layout_scored([[a], [b], [c]], pad, packed=False)
    packed = layout_scored([[a, b, c]], pad, packed=True)
    assert padded["seq_index"][padded["labels"] != -100].tolist() == [0, 1, 2]
    assert (padded["labels"] != -100).nonzero().tolist() == [[0, 2], [1, 1], [2, 0]]
    assert (packed["labels"] != -100).nonzero().tolist() == [[0, 2], [0, 4], [0, 6]]
    assert packed["seq_index"][packed["labels"] != -100].tolist() == [0, 1, 2]
    assert packed["segment_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_packed_rows_give_the_padded_loss_and_gradients(tmp_path, tok):
    dataset = reward_pairs_from_files([DEMO_TRAIN], tok, TokenizeSettings(seq_length=96))
    torch.manual_seed(0)
    model = ScoreModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                 num_query_groups=2, vocab_size=tok.vocab_size))
    algorithm = RewardModelAlgorithm(RewardSettings(center_rewards_coefficient=0.1), tok.pad_id)
    module = ModelWithHead(model, algorithm.head())

    def loss_and_grads(items, packed):
        model.zero_grad()
        batch = algorithm.make_batch(dataset, items, packed)
        loss, sums = algorithm.loss(batch, module(batch.input_ids, labels=batch.labels,
                                                  segment_ids=batch.segment_ids), 6)
        loss.backward()
        return loss.detach(), sums, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = loss_and_grads(list(range(6)), packed=False)
    packed = loss_and_grads([[0, 1, 2], [3, 4, 5]], packed=True)  # 2 rows of 3 whole pairs
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    for name in padded[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], rtol=1e-5, atol=1e-6)
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ recipe
def test_the_demo_learns(tmp_path):
    """train_reward_model.py's defaults (conf/training_rm.yaml): the bundled comparison pairs, 240 steps."""
    from nemo_aligner.recipes.rm import run_rm

    result = run_rm(rm_config(tmp_path, "exp_manager.progress_bar=false", "exp_manager.create_tensorboard_logger=false",
                              "exp_manager.create_checkpoint_callback=false", "trainer.rm.val_check_interval=120"))
    rows = read_metrics(tmp_path)
    assert len(rows) == 240 and abs(result["initial_val"]["acc"] - 0.5) < 0.15
    assert result["val"]["acc"] >= 0.95 and result["val"]["loss"] < 0.2
    assert rows[-1]["val/rewards_margin_mean"] > 1.0 and rows[-1]["train/rewards_chosen_mean"] > rows[-1][
        "train/rewards_rejected_mean"]
    for key in ("train/rewards_all_std", "train/grad_norm", "train/lr", "train/tokens_per_sec", "data/truncated_pairs"):
        assert key in rows[-1], key


def test_config_defaults_are_nemo_aligners_and_errors_name_the_key(tmp_path):
    cfg = RMRunConfig()
    loop, model = cfg.trainer.rm, cfg.model
    assert (loop.max_epochs, loop.max_steps, loop.val_check_interval, loop.save_interval,
            loop.limit_val_batches, loop.gradient_clip_val) == (1, -1, 100, 100, 1.0, 1.0)
    assert (model.micro_batch_size, model.global_batch_size, model.optim.lr, model.reward_model_type,
            model.force_head_dtype) == (1, 64, 9e-6, "binary_ranking", "float32")
    for override, message in [("model.reward_model_type=regression", "regression.*not supported"),
                              ("model.center_rewards_coefficient=-1", "center_rewards_coefficient=-1"),
                              ("model.rm_head=1", "unknown config key 'model.rm_head'"),
                              ("model.output_sequence=true", "output_sequence=true"),
                              ("model.data.data_impl=packed_jsonl", "model.data.data_impl='packed_jsonl'")]:
        with pytest.raises(ConfigError, match=message):
            rm_config(tmp_path, override)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny transformers Llama causal LM with the demo tokenizer: what a user's RM run starts from."""
    import transformers

    folder = tmp_path_factory.mktemp("llama")
    tok = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    return folder


def val_scores(hf_dir, tok, count=6):
    """(our scoring API's, transformers' AutoModelForSequenceClassification) scores of the first validation pairs."""
    import transformers

    from nemo_aligner.rewards.reward_model import RewardModel

    dataset = reward_pairs_from_files([DEMO_VAL], tok, TokenizeSettings(seq_length=96))
    sequences = [list(ids) for pair in dataset.pairs[:count] for ids, _ in pair.sequences()]
    ours = RewardModel.load(hf_dir).score(sequences)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = torch.cat([hf(torch.tensor([s])).logits.view(1) for s in sequences])
    return ours, theirs


def without_test(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("test/")}


def test_resume_continues_the_exact_trajectory(tmp_path):
    common = [*FAST, "model.optim.sched.max_steps=6", "trainer.rm.save_interval=3", "trainer.rm.val_check_interval=3",
              "model.center_rewards_coefficient=0.01"]
    from nemo_aligner.recipes.rm import run_rm

    run_rm(rm_config(tmp_path / "straight", *common, "trainer.rm.max_steps=6"))
    run_rm(rm_config(tmp_path / "resumed", *common, "trainer.rm.max_steps=3"))
    assert run_rm(rm_config(tmp_path / "resumed", *common, "trainer.rm.max_steps=6"))["resumed"]
    # the test split is evaluated at the end of each invocation (so also at step 3 of the interrupted one)
    straight = [without_test(comparable(r)) for r in read_metrics(tmp_path / "straight")]
    resumed = [without_test(comparable(r)) for r in read_metrics(tmp_path / "resumed")]
    assert [r["step"] for r in resumed] == list(range(1, 7)) and "val/acc" in resumed[-1]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), (a["step"], key)


def test_packed_and_padded_runs_train_and_the_export_scores_equal_transformers(tmp_path, tok):
    from nemo_aligner.recipes.rm import run_rm

    common = [*FAST, "trainer.rm.max_steps=2", "exp_manager.create_checkpoint_callback=false",
              "model.encoder_seq_length=80", "model.global_batch_size=4", "model.micro_batch_size=2"]
    run_rm(rm_config(tmp_path / "padded", *common, "model.micro_batch_size=4", "model.global_batch_size=8"))
    run_rm(rm_config(tmp_path / "packed", *common, "model.data.packing=true", "model.data.pack_size=320",
                     "model.data.packing_algorithm=first_fit_shuffle"))
    padded, packed = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")
    assert packed[0]["data/pairs_per_pack"] > 1 and "train/rewards_margin_mean" in packed[0]
    for key in ("train/loss", "train/acc", "train/rewards_all_std"):
        assert np.isfinite(packed[-1][key]) and np.isfinite(padded[-1][key]), key
    ours, theirs = val_scores(tmp_path / "padded/hf", tok)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.fixture
def messages():
    """The messages the "nemo_aligner" logger emits (it does not propagate to pytest's caplog)."""
    import logging

    records, logger = [], logging.getLogger("nemo_aligner")
    handler, level = logging.Handler(), logger.level
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_lora_from_a_causal_lm_trains_adapters_and_the_fresh_head(tmp_path, causal_lm, tok, messages):
    import peft
    import transformers

    from nemo_aligner.models.hf import load_pretrained
    from nemo_aligner.models.hf.peft import load_adapters
    from nemo_aligner.recipes.rm import run_rm

    lora = [*FAST, "trainer.rm.max_steps=3", f"pretrained_checkpoint.restore_from_path={causal_lm}",
            "model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[all]",
            "model.peft.lora_tuning.adapter_dim=4", "model.optim.lr=1e-2", "exp_manager.create_checkpoint_callback=false"]
    cfg = rm_config(tmp_path / "adapters", *lora)
    torch.manual_seed(0)  # LoRA's A init draws from the global RNG when the model comes from a checkpoint
    run_rm(cfg)
    assert any("starts fresh" in m for m in messages)
    hf_dir = tmp_path / "adapters/hf"
    adapter = json.loads((hf_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    assert adapter["base_model_name_or_path"] == str(causal_lm)
    fresh = load_pretrained(causal_lm, task="sequence_classification", seed=cfg.model.seed)
    trained = load_pretrained(causal_lm, task="sequence_classification", seed=cfg.model.seed)
    load_adapters(trained, hf_dir)
    assert not torch.equal(trained.output_layer.weight, fresh.output_layer.weight)  # the head trained
    ids = torch.tensor([tok.encode("What color is the sky? Blue.")])
    want = trained.eval().logits(ids)[0, -1]
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1).eval()
    torch.manual_seed(0)
    run_rm(rm_config(tmp_path / "merged", *lora, "model.peft.merge_on_export=true"))  # the same run, merged
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged/hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.view(()), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits.view(()), want, rtol=0, atol=1e-5)


def test_bf16_mixed_precision_scores_in_fp32(tmp_path):
    from nemo_aligner.recipes.rm import run_rm

    result = run_rm(rm_config(tmp_path, *FAST, "trainer.rm.max_steps=2", "trainer.precision=bf16-mixed",
                              "exp_manager.create_checkpoint_callback=false"))
    assert np.isfinite(result["train"]["loss"]) and result["train"]["rewards_all_std"] > 0


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_nemo_aligner_command_line_with_comparison_files_and_a_bad_file(tmp_path, causal_lm):
    texts = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:8]]
    lines = [{"text": f"{r['prompt'][-1]['content']} {r[key]['content']}"}
             for r in texts for key in ("chosen_response", "rejected_response")]
    data = write_rows(tmp_path / "comparisons.jsonl", lines)
    out = _cli("trainer.num_nodes=1", "trainer.devices=1", "++model.micro_batch_size=1", "++model.global_batch_size=4",
               f"pretrained_checkpoint.restore_from_path={causal_lm}",
               f"model.data.data_prefix={{train: [{data}], validation: [{data}], test: [{data}]}}",
               f"exp_manager.explicit_log_dir={tmp_path / 'results'}", "++trainer.rm.max_epochs=1",
               "++trainer.rm.max_steps=2", "++trainer.rm.limit_val_batches=1", "++exp_manager.progress_bar=false",
               "++model.reward_model_type=binary_ranking")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done: 2 steps" in out.stdout and "nemo_comparison: 8" in out.stdout
    config = json.loads((tmp_path / "results/hf/config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    odd = write_rows(tmp_path / "odd.jsonl", lines[:3])
    out = _cli(f"model.data.data_prefix={{train: [{odd}]}}", f"exp_manager.explicit_log_dir={tmp_path / 'bad'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{odd}: 3 lines, an odd number" in out.stderr
