"""Reward models and Hugging Face: `<Family>ForSequenceClassification` in and out for every family (scores
equal transformers' in fp32), a causal LM loaded as a reward model (fresh head, seeded, base unchanged),
the scoring API against transformers, and LoRA reward models as PEFT SEQ_CLS folders."""

import json
import logging
import os

import pytest
import torch
import transformers as tf

from nemo_aligner.models.hf import FAMILIES, load_pretrained, save_pretrained
from nemo_aligner.models.hf.peft import load_adapters, save_adapters
from nemo_aligner.models.hf.sequence_classification import ARCHITECTURES
from nemo_aligner.models.lora import apply_lora, is_adapter_key
from nemo_aligner.models.score import SEQUENCE_CLASSIFICATION, ScoreModel
from nemo_aligner.rewards.reward_model import RewardModel
from tests.conftest import FAMILY_KINDS, HF_KINDS, tiny_hf_model

SEQ_CLS = SEQUENCE_CLASSIFICATION
PAD = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash (conftest.py)


def hf_reward_model(kind: str, pad_token_id: int = PAD):
    """A transformers-made `<Family>ForSequenceClassification` (num_labels 1) of a test family, random head."""
    config = tiny_hf_model(kind).config
    config.num_labels, config.pad_token_id = 1, pad_token_id
    torch.manual_seed(1)
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


def padded_batch(vocab: int):
    """Three rows of different lengths, right-padded with PAD."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab, 100), (3, 12), generator=generator)
    ids[1, 7:] = PAD
    ids[2, 5:] = PAD
    return ids, torch.tensor([11, 6, 4])  # the scored position of each row: its last non-PAD token


def our_scores(model, ids, positions):
    with torch.no_grad():
        return model.logits(ids)[torch.arange(len(ids)), positions]


def test_every_family_has_its_transformers_sequence_classifier():
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as MAPPING

    assert set(ARCHITECTURES) == set(FAMILIES)
    for model_type, architecture in ARCHITECTURES.items():
        assert MAPPING[model_type] == architecture, model_type


@pytest.mark.parametrize("kind", HF_KINDS + FAMILY_KINDS)
def test_reward_model_in_and_out_scores_equal_transformers(kind, tmp_path):
    hf = hf_reward_model(kind)
    hf.save_pretrained(tmp_path / "theirs")
    ours = load_pretrained(tmp_path / "theirs", task=SEQ_CLS).eval()
    assert isinstance(ours, ScoreModel) and ours.pad_token_id == PAD
    ids, positions = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        want = hf(ids).logits.squeeze(-1)
    torch.testing.assert_close(our_scores(ours, ids, positions), want, rtol=0, atol=1e-4)

    save_pretrained(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours/config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[ours.hf_model_type]] and config["pad_token_id"] == PAD
    back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert back.config.num_labels == 1 and type(back).__name__ == ARCHITECTURES[ours.hf_model_type]
    from safetensors import safe_open

    with safe_open(tmp_path / "ours/model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "score.weight" in names and "lm_head.weight" not in names
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits.squeeze(-1), want, rtol=0, atol=1e-4)


def test_a_causal_lm_loads_as_a_reward_model_with_a_fresh_seeded_head(hf_checkpoints, caplog):
    folder, lm = hf_checkpoints["llama_gqa_llama3_rope"]
    with caplog.at_level(logging.INFO, logger="nemo_aligner"):
        rm = load_pretrained(folder, task=SEQ_CLS, seed=7).eval()
    assert any("no score.weight" in r.getMessage() and "starts fresh" in r.getMessage() for r in caplog.records)
    again = load_pretrained(folder, task=SEQ_CLS, seed=7)
    other = load_pretrained(folder, task=SEQ_CLS, seed=8)
    head = rm.output_layer.weight
    assert head.shape == (1, rm.config.hidden_size) and torch.equal(head, again.output_layer.weight)
    assert not torch.equal(head, other.output_layer.weight)
    assert head.std().item() == pytest.approx(rm.config.init_method_std, rel=0.5)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the base is the causal LM's: the score is the head applied to its last hidden state
        hidden = lm.model(ids).last_hidden_state
        torch.testing.assert_close(rm.logits(ids), (hidden @ head.T).squeeze(-1), rtol=0, atol=1e-5)


def test_wrong_task_and_multi_label_checkpoints_are_refused(tmp_path):
    hf_reward_model("llama_tied").save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"score\.weight.*load it with task='sequence_classification'"):
        load_pretrained(tmp_path / "rm")
    config = tiny_hf_model("qwen2").config
    config.num_labels, config.pad_token_id = 3, PAD
    tf.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match=r"config\.json: a sequence classifier with 3 labels.*num_labels=1"):
        load_pretrained(tmp_path / "three", task=SEQ_CLS)


def test_scoring_api_gives_transformers_scores_in_the_order_given(tmp_path):
    hf = hf_reward_model("qwen3_tied")
    hf.save_pretrained(tmp_path / "rm")
    scorer = RewardModel.load(tmp_path / "rm", micro_batch_size=2)
    lengths = [5, 11, 3, 8, 8, 1, 6]
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(5, 300, (n,), generator=generator).tolist() for n in lengths]
    sequences[3][-1] = PAD  # ends in the pad id (pad == eos): scored at the token before, as transformers does
    got = scorer.score(sequences)
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([s])).logits.squeeze() if s[-1] != PAD
                            else hf(torch.tensor([s[:-1]])).logits.squeeze() for s in sequences])
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    prompts, completions = [s[:2] for s in sequences], [s[2:] for s in sequences]
    torch.testing.assert_close(scorer.score(prompts, completions), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sequence 1 has no tokens"):
        scorer.score([[5, 6], []])


def test_scoring_api_refuses_a_folder_without_a_trained_head(hf_checkpoints):
    folder, _ = hf_checkpoints["qwen2"]
    with pytest.raises(ValueError, match=r"no score\.weight, so not a reward model"):
        RewardModel.load(folder)


def test_lora_reward_model_exports_a_peft_seq_cls_folder_with_the_head(tmp_path):
    import peft

    from nemo_aligner.config.sections import LoraConfig

    hf_reward_model("llama_gqa_llama3_rope").save_pretrained(tmp_path / "base")
    model = load_pretrained(tmp_path / "base", task=SEQ_CLS).eval()
    apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=4, alpha=8))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained adapters and head: both must reach the folder
        for name, param in model.named_parameters():
            if is_adapter_key(name) or name == "output_layer.weight":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    save_adapters(model, tmp_path / "adapters", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapters/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    ids, positions = padded_batch(128)
    want = our_scores(model, ids, positions)
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapters", num_labels=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits.squeeze(-1), want, rtol=0, atol=1e-4)
    scorer = RewardModel.load(tmp_path / "adapters")  # the scoring API reads the PEFT folder over its base
    torch.testing.assert_close(scorer.score([ids[r, :p + 1].tolist() for r, p in enumerate(positions.tolist())]),
                               want, rtol=0, atol=1e-5)
    restored = load_pretrained(tmp_path / "base", task=SEQ_CLS).eval()
    load_adapters(restored, tmp_path / "adapters")
    torch.testing.assert_close(our_scores(restored, ids, positions), want, rtol=0, atol=1e-5)
    assert restored.output_layer.weight.requires_grad is False  # restore freezes; setup_peft makes the head train
    from nemo_aligner.models.gpt import GPTModel

    with pytest.raises(ValueError, match="sequence-classification head"):  # a causal LM cannot take them
        load_adapters(GPTModel(model.config), tmp_path / "adapters")


@pytest.mark.skipif(not os.environ.get("NEMO_ALIGNER_REAL_MODEL"),
                    reason="set NEMO_ALIGNER_REAL_MODEL=/path/to/a/causal-LM folder (e.g. SmolLM2-135M-Instruct)")
def test_a_real_causal_lm_as_a_reward_model_exports_scores_transformers_reproduces(tmp_path):
    from nemo_aligner.data.tokenizer import Tokenizer

    folder = os.environ["NEMO_ALIGNER_REAL_MODEL"]
    tok = Tokenizer.from_path(folder)
    ours = load_pretrained(folder, task=SEQ_CLS).eval()
    save_pretrained(ours, tmp_path / "rm", tokenizer=tok)
    hf = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    texts = [tok.apply_chat_template(messages + [{"role": "assistant", "content": a}]) for a in ("Paris.", "Berlin.")]
    sequences = [tok.encode(t) for t in texts]
    scores = RewardModel.load(tmp_path / "rm").score(sequences)
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([s])).logits.view(()) for s in sequences])
    torch.testing.assert_close(scores, want, rtol=0, atol=1e-4)
