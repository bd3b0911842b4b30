"""What a user gets from `pip install`: the `nemo-aligner` command from a built wheel in a fresh environment
(its help, the demo from an empty directory), NeMo-Aligner's own config file, export fidelity (dtype,
generation_config.json, tokenizer files, save_hf_every_checkpoint, `nemo-aligner export`), tool calls."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nemo_aligner.config import ConfigError, DPORunConfig, load_config
from nemo_aligner.data.rows import DataError
from tests.helpers import DEMO_TRAIN, DEMO_VAL, FAST, ROOT, dpo_config

NEMO_YAML = ROOT / "tests/data/nemo_aligner_gpt_dpo.yaml"
QUIET = ["exp_manager.create_tensorboard_logger=false", "exp_manager.progress_bar=false"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel built from this checkout installed (not editable); its dependencies come
    from the test environment's site-packages through a .pth line (whose own .pth files, the editable
    install's among them, are not processed), so nothing is downloaded."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(ROOT)], capture_output=True, text=True, env=_env())
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("nemo_aligner-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, env=_env())
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir


def test_the_wheel_ships_the_command_the_configs_and_the_demo(installed, tmp_path):
    bin_dir = installed / "bin"
    where = subprocess.check_output([bin_dir / "python", "-c", "import nemo_aligner; print(nemo_aligner.__file__)"],
                                    text=True, cwd=tmp_path, env=_env()).strip()
    assert where.startswith(str(installed)), where  # the wheel's copy, not this checkout
    top = subprocess.run([bin_dir / "nemo-aligner", "--help"], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert top.returncode == 0 and all(f"  {c}" in top.stdout for c in ("sft", "dpo", "rm", "generate", "pack", "export"))
    keys = subprocess.run([bin_dir / "nemo-aligner", "dpo", "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env=_env())
    assert keys.returncode == 0
    assert "model.dpo.ref_policy_kl_penalty = " in keys.stdout and "KL" in keys.stdout  # default and description
    demo = subprocess.run([bin_dir / "nemo-aligner", "dpo", "trainer.dpo.max_steps=2", "trainer.dpo.limit_val_batches=1",
                           *QUIET], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert demo.returncode == 0, demo.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results/dpo_demo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert (tmp_path / "results/dpo_demo/hf/model.safetensors").is_file()
    unknown = subprocess.run([bin_dir / "nemo-aligner", "wizard"], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert unknown.returncode != 0 and "unknown command 'wizard'" in unknown.stderr


def test_a_nemo_aligner_config_file_runs_with_its_resolvers_and_ignored_keys(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples/nlp/gpt/train_gpt_dpo.py"), f"--config-path={NEMO_YAML.parent}",
           f"--config-name={NEMO_YAML.stem}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
           f"model.data.data_prefix={{train: [{DEMO_TRAIN}], validation: [{DEMO_VAL}]}}", "++model.encoder_seq_length=96",
           "trainer.dpo.limit_val_batches=1", "++exp_manager.progress_bar=false", "++exp_manager.create_tensorboard_logger=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    ignored = [line for line in log.splitlines() if "NeMo-only keys accepted and ignored" in line]
    assert len(ignored) == 1 and "model.optim.bucket_cap_mb" in ignored[0] and "precision (" in ignored[0]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2  # trainer.dpo.max_steps=2 from the file


def test_nemo_keys_that_would_change_the_result_are_refused_by_name():
    from omegaconf import OmegaConf

    raw = OmegaConf.load(NEMO_YAML)
    raw.pop("defaults")
    cfg = load_config(raw, DPORunConfig)  # resolvers and relative interpolations resolve against the schema
    assert cfg.model.data.seq_length == cfg.model.encoder_seq_length and cfg.model.dpo.log_prob_forward_micro_batch_size == 1
    assert cfg.exp_manager.checkpoint_callback_params.model_parallel_size == 1
    raw.model.peft.lora_tuning.layer_selection = [1, 2]
    with pytest.raises(ConfigError, match=r"model\.peft\.lora_tuning\.layer_selection=\[1, 2\] is a NeMo setting"):
        load_config(raw, DPORunConfig)
    # Lightning's trainer.max_steps is an interpolation in NeMo's files; a literal would be lost, so it is refused
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=100 is not read here .* set trainer\.dpo\.max_steps"):
        load_config({"trainer": {"max_steps": 100}}, DPORunConfig)
    assert load_config({"trainer": {"max_steps": 7, "dpo": {"max_steps": 7}}}, DPORunConfig).trainer.dpo.max_steps == 7


def _bf16_checkpoint(folder: Path) -> Path:
    """A tiny bf16 llama over the demo tokenizer, with a generation_config.json and a special_tokens_map.json."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=400, max_position_embeddings=128, pad_token_id=0,
                            bos_token_id=1, eos_token_id=4)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = tf.GenerationConfig(bos_token_id=1, eos_token_id=[4, 2], temperature=0.6, do_sample=True)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((ROOT / "nemo_aligner/demo/tokenizer" / name).read_bytes())
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def test_bf16_in_is_bf16_out_with_generation_config_and_tokenizer_files_and_an_export_per_checkpoint(tmp_path):
    from nemo_aligner.recipes.dpo import run_dpo

    ckpt = _bf16_checkpoint(tmp_path / "ckpt")
    cfg = dpo_config(tmp_path / "run", *FAST, *QUIET, f"pretrained_checkpoint.restore_from_path={ckpt}",
                     "trainer.dpo.max_steps=2", "trainer.dpo.save_interval=1",
                     "exp_manager.checkpoint_callback_params.save_top_k=-1",
                     "exp_manager.checkpoint_callback_params.save_hf_every_checkpoint=true", demo=False)
    hf = Path(run_dpo(cfg)["hf_dir"])
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(hf / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (hf / "model.safetensors").stat().st_size < 0.6 * (4 * sum(p.numel() for p in _params(ckpt)))
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [4, 2]
    assert (hf / "special_tokens_map.json").is_file()
    per_step = sorted((tmp_path / "run/checkpoints").glob("step_*/hf/config.json"))
    assert [p.parent.parent.name for p in per_step] == ["step_00000001", "step_00000002"]
    fp32 = dpo_config(tmp_path / "run32", *FAST, *QUIET, f"pretrained_checkpoint.restore_from_path={ckpt}",
                      "trainer.dpo.max_steps=1", "model.export_dtype=fp32", demo=False)
    assert json.loads((Path(run_dpo(fp32)["hf_dir"]) / "config.json").read_text())["torch_dtype"] == "float32"


def _params(folder):
    import transformers as tf

    return list(tf.AutoModelForCausalLM.from_pretrained(folder).parameters())


def test_export_command_writes_what_the_run_wrote_at_that_step(tmp_path):
    import transformers as tf

    from nemo_aligner.recipes.dpo import run_dpo
    from nemo_aligner.recipes.export import main as export_main

    result = run_dpo(dpo_config(tmp_path / "run", *FAST, *QUIET, "trainer.dpo.max_steps=3", "trainer.dpo.save_interval=3"))
    out = export_main([f"run_dir={tmp_path / 'run'}", "checkpoint=latest", f"output_dir={tmp_path / 'exported'}"])
    ids = torch.tensor([[1, 7, 30, 90, 200, 12]])
    ours = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    runs = tf.AutoModelForCausalLM.from_pretrained(result["hf_dir"]).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, runs(ids).logits)
    best = export_main([f"run_dir={tmp_path / 'run'}"])  # checkpoint=best (val_loss): its own folder
    assert best.name.startswith("hf_step_") and (best / "tokenizer.json").is_file()
    with pytest.raises(SystemExit) as stop:
        export_main([f"run_dir={tmp_path / 'run'}", "checkpoint=step_9"])
    assert stop.value.code == 1


TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}[call {{ c['function']['name'] }}"
    "({{ c['function']['arguments'] }})]{% endfor %}{% endif %}{{ eos_token if m['role'] == 'assistant' else '' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_tool_calls_reach_a_template_that_renders_them_and_are_refused_by_one_that_would_drop_them(tmp_path):
    from nemo_aligner.data.dataset import TokenizeSettings
    from nemo_aligner.data.preference.dataset import PreferenceDataset
    from nemo_aligner.data.tokenizer import Tokenizer

    tok = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    prompt = [{"role": "user", "content": "weather?"},
              {"role": "assistant", "content": None,
               "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
              {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    rows = tmp_path / "tools.jsonl"
    rows.write_text(json.dumps({"prompt": prompt, "chosen": "It is sunny.", "rejected": "No idea."}) + "\n")
    data = PreferenceDataset.from_files([rows], tok, TokenizeSettings(seq_length=256, chat_template=TOOL_TEMPLATE))
    text = tok.decode(data.pairs[0].prompt.tolist() + data.pairs[0].chosen.tolist())
    assert "[call get_weather({})]" in text and "<|tool|>sunny" in text
    with pytest.raises(DataError, match=r"tools\.jsonl:1: chat template 'chatml' does not render tool calls"):
        PreferenceDataset.from_files([rows], tok, TokenizeSettings(seq_length=256, chat_template="chatml"))
