"""The generate CLI (examples/nlp/gpt/generate.py, recipes/generate.py) and samples at validation
(exp_manager.val_samples): output rows, checkpoints of every accepted kind, error messages, and replies
logged at every validation of a training run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_aligner.config import GenerateRunConfig
from nemo_aligner.generation import Sampler, SamplingParams, eos_token_ids, prompt_token_ids
from nemo_aligner.generation.scoring import completion_logprobs
from nemo_aligner.models.hf import load_pretrained
from tests.conftest import tiny_hf_model
from tests.helpers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
GENERATE_YAML = ROOT / "nemo_aligner/conf/generate.yaml"
MESSAGES = [{"role": "system", "content": "You answer questions about colors."},
            {"role": "user", "content": "Which color does the banana have?"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash (conftest.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from nemo_aligner.data.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("qwen3")
    tiny_hf_model("qwen3_window").save_pretrained(folder)
    Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer").save(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"id": "a", "prompt": MESSAGES}, {"id": "b", "prompt": "The banana is", "extra": [1, 2]},
            {"id": "c", "prompt": MESSAGES[1:]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, *overrides):
    """What `generate.py <overrides>` gets (generate.yaml has no exp_manager, so no log dir)."""
    from omegaconf import OmegaConf

    from nemo_aligner.config import load_config

    raw = OmegaConf.to_container(OmegaConf.load(GENERATE_YAML))
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    return load_config(OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides))), GenerateRunConfig)


def _run(tmp_path, checkpoint, prompts_file, *overrides):
    from nemo_aligner.recipes.generate import run_generate

    out = tmp_path / "out.jsonl"
    result = run_generate(_config(tmp_path, f"pretrained_checkpoint.restore_from_path={checkpoint}",
                                  f"generation.input_file={prompts_file}", f"generation.output_file={out}",
                                  "generation.progress_bar=false", *overrides))
    return result, [json.loads(line) for line in out.read_text().splitlines()]


def test_cli_writes_each_row_with_its_completions_token_ids_logprobs_and_finish_reasons(checkpoint, prompts_file,
                                                                                       tmp_path):
    from nemo_aligner.data.tokenizer import Tokenizer

    result, rows = _run(tmp_path, checkpoint, prompts_file, "generation.temperature=0.8", "generation.top_k=50",
                        "generation.num_samples=3", "generation.max_new_tokens=9", "generation.batch_size=4",
                        "generation.seed=7")
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[1]["extra"] == [1, 2]  # columns passed through
    assert result["prompts"] == 3 and result["completions"] == 9 and result["tokens_per_sec"] > 0
    tokenizer, model = Tokenizer.from_path(checkpoint), load_pretrained(checkpoint).eval()
    ids = [prompt_token_ids(p, tokenizer) for p in (MESSAGES, "The banana is", MESSAGES[1:])]
    # one call of the sampler with every prompt in one batch: the CLI's chunks (batch_size 4) change nothing
    direct = Sampler(model, tokenizer, eos_token_ids(tokenizer, checkpoint), batch_size=64).generate(
        ids, SamplingParams(max_new_tokens=9, temperature=0.8, top_k=50, num_samples=3, seed=7))
    for i, row in enumerate(rows):
        mine = direct[3 * i:3 * i + 3]
        assert row["completion_token_ids"] == [c.token_ids for c in mine]
        assert row["completions"] == [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in mine]
        assert row["finish_reasons"] == [c.finish_reason for c in mine]
        assert set(row["finish_reasons"]) <= {"stop", "length"}
        for tokens, logps in zip(row["completion_token_ids"], row["completion_logprobs"]):
            assert logps == pytest.approx(completion_logprobs(model, ids[i], tokens, 0.8), abs=1e-4)
    assert len({tuple(t) for t in rows[0]["completion_token_ids"]}) > 1  # the samples differ


def test_cli_restores_a_peft_adapter_folder_and_a_training_run_dir(checkpoint, prompts_file, tmp_path):
    import shutil

    from nemo_aligner.config.sections import LoraConfig
    from nemo_aligner.models.hf.peft import save_adapters
    from nemo_aligner.models.lora import apply_lora

    model = load_pretrained(checkpoint)
    apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=4, row_init_method="normal"))
    save_adapters(model, tmp_path / "adapter", base_model_name_or_path=str(checkpoint))
    greedy = ["generation.temperature=0", "generation.max_new_tokens=8"]
    _, with_adapters = _run(tmp_path / "a", tmp_path / "adapter", prompts_file, *greedy)
    _, base = _run(tmp_path / "b", checkpoint, prompts_file, *greedy)
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "hf")  # a finished training run: <log_dir>/hf is its export
    _, from_run = _run(tmp_path / "c", run_dir, prompts_file, *greedy)
    ids = [prompt_token_ids(MESSAGES, _tok(checkpoint))]
    want = Sampler(model.eval(), eos_token_ids=eos_token_ids(_tok(checkpoint), checkpoint)).generate(
        ids, SamplingParams(max_new_tokens=8, temperature=0))
    assert with_adapters[0]["completion_token_ids"] == [want[0].token_ids]
    assert with_adapters[0]["completion_token_ids"] != base[0]["completion_token_ids"]
    assert from_run == base


def _tok(folder):
    from nemo_aligner.data.tokenizer import Tokenizer

    return Tokenizer.from_path(folder)


def test_cli_errors_name_the_key_or_the_file_line(checkpoint, prompts_file, tmp_path):
    from nemo_aligner.data.rows import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: missing key 'prompt' \(generation.prompt_key\)"):
        _run(tmp_path, checkpoint, bad)
    bad.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: expected a string or a non-empty list of {{role, content}}"):
        _run(tmp_path, checkpoint, bad)
    with pytest.raises(ValueError, match=r"restore_from_path=/nonexistent: no such folder"):
        _run(tmp_path, "/nonexistent", prompts_file)
    step = tmp_path / "step_00000003"
    step.mkdir()
    (step / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a resumable training checkpoint \(DCP shards without the architecture, "):
        _run(tmp_path, step, prompts_file)
    with pytest.raises(ValueError, match=r"trainer\.num_nodes x trainer\.devices = 2 must equal "
                                         r"model\.tensor_model_parallel_size = 1"):
        _run(tmp_path, checkpoint, prompts_file, "trainer.devices=2")
    with pytest.raises(ValueError, match=r"generation\.top_p=1\.5; expected 0 < top_p <= 1"):
        _config(tmp_path, "generation.top_p=1.5")
    with pytest.raises(ValueError, match=r"generation\.backend='hf'; expected one of \['builtin', 'vllm'\]"):
        _config(tmp_path, "generation.backend=hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"generation\.backend=vllm needs vLLM: `pip install -e \"\.\[vllm\]\"`"):
            _run(tmp_path, checkpoint, prompts_file, "generation.backend=vllm")


def test_the_script_prints_a_summary_and_refuses_unknown_keys(checkpoint, prompts_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "examples/nlp/gpt/generate.py")]
    done = subprocess.run([*script, f"pretrained_checkpoint.restore_from_path={checkpoint}",
                           f"generation.input_file={prompts_file}", f"generation.output_file={tmp_path / 'o.jsonl'}",
                           "generation.max_new_tokens=4"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "done: 3 prompts, 3 completions" in done.stdout and "tokens/s" in done.stdout
    assert "generate: 100%" in done.stderr  # the progress bar
    done = subprocess.run([*script, "generation.temprature=0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "temprature" in done.stderr


# ------------------------------------------------------------------------------------------ val samples
def test_val_samples_are_generated_and_logged_at_every_validation(tmp_path, monkeypatch):
    from nemo_aligner.recipes.sft import run_sft
    from tests.helpers import sft_config
    from tests.test_sft import FAST

    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    cfg = sft_config(tmp_path, *FAST, "trainer.sft.max_steps=4", "trainer.sft.val_check_interval=2",
                     "trainer.sft.limit_val_batches=1", "exp_manager.create_checkpoint_callback=false",
                     "exp_manager.val_samples.num_prompts=2", "exp_manager.val_samples.max_new_tokens=6")
    run_sft(cfg)
    lines = [json.loads(line) for line in (tmp_path / "val_samples.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]  # before training and at each validation
    val_steps = [r["step"] for r in read_metrics(tmp_path) if "val/loss" in r]
    assert val_steps == [2, 4]
    for line in lines:
        assert len(line["samples"]) == 2
        for sample in line["samples"]:
            assert sample["prompt"].endswith("<|im_start|>assistant\n")  # the validation prompt, templated as trained
            assert sample["finish_reason"] in ("stop", "length") and 1 <= sample["num_tokens"] <= 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    texts = events.Tensors("val/samples/text_summary")
    assert [t.step for t in texts] == [0, 2, 4]


def test_val_samples_settings_are_checked_by_key():
    from nemo_aligner.config.sections import ValSamplesConfig

    with pytest.raises(ValueError, match=r"exp_manager\.val_samples\.num_prompts=-1; expected >= 0"):
        ValSamplesConfig(num_prompts=-1)
    with pytest.raises(ValueError, match=r"exp_manager\.val_samples\.temperature=-0\.5"):
        ValSamplesConfig(num_prompts=1, temperature=-0.5)
