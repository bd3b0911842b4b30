"""The structure the code promises (docs/architecture.md): configs load without torch, every GPTConfig
field is a model.* key (or derived, and listed), NeMo's ignored keys are one list, and imports point
down only."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nemo_aligner"


def test_loading_a_config_does_not_import_torch():
    code = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "from nemo_aligner.config import DPORunConfig, SFTRunConfig, load_config\n"
        "for name, schema in (('gpt_dpo', DPORunConfig), ('gpt_sft', SFTRunConfig)):\n"
        "    raw = OmegaConf.to_container(OmegaConf.load(f'examples/nlp/gpt/conf/{name}.yaml'))\n"
        "    raw.pop('defaults'); raw.pop('hydra')\n"
        "    cfg = load_config(raw, schema)\n"
        "    assert cfg.model.peft.lora_tuning.target_modules == ['attention_qkv']\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_gpt_config_field_is_a_model_key_with_the_same_default_or_derived():
    from nemo_aligner.config.sections import ModelConfig
    from nemo_aligner.models.gpt import GPTConfig
    from nemo_aligner.recipes.skeleton import DERIVED_GPT_FIELDS

    keys = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for field in dataclasses.fields(GPTConfig):
        if field.name in DERIVED_GPT_FIELDS:
            continue
        assert field.name in keys, f"GPTConfig.{field.name} is neither a model.* key nor in DERIVED_GPT_FIELDS"
        assert keys[field.name].default == field.default, (
            f"model.{field.name} defaults to {keys[field.name].default!r} but GPTConfig.{field.name} to "
            f"{field.default!r}")


def test_a_from_scratch_config_reaches_every_architecture_key():
    from nemo_aligner.config.dpo import DPOModelConfig
    from nemo_aligner.recipes.skeleton import gpt_config_from_model

    cfg = DPOModelConfig(sliding_window=16, rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=2.0,
                         rope_high_freq_factor=8.0, rope_original_max_position_embeddings=1024, num_query_groups=2,
                         activations_checkpoint_granularity="full")
    gpt = gpt_config_from_model(cfg, vocab_size=300)
    assert (gpt.sliding_window, gpt.rope_low_freq_factor, gpt.rope_high_freq_factor,
            gpt.rope_original_max_position_embeddings) == (16, 2.0, 8.0, 1024)
    assert gpt.vocab_size == 300 and gpt.activations_checkpointing and gpt.num_query_groups == 2


def test_ignored_nemo_keys_are_declared_and_logged_once_when_set(caplog):
    from nemo_aligner.config import DPORunConfig, SFTRunConfig
    from nemo_aligner.config.nemo_compat import IGNORED_KEYS, ignored_keys_set, log_ignored_keys

    def has(cfg, key):
        for part in key.split("."):
            if not hasattr(cfg, part):
                return False
            cfg = getattr(cfg, part)
        return True

    for key in IGNORED_KEYS:  # every listed key is declared in a schema
        assert has(DPORunConfig(), key) or has(SFTRunConfig(), key), f"{key} is listed as ignored but is no key"
    cfg = DPORunConfig()
    assert ignored_keys_set(cfg) == {} and ignored_keys_set(SFTRunConfig()) == {}
    cfg.model.megatron_amp_O2 = True
    cfg.trainer.log_every_n_steps = 10
    with caplog.at_level("INFO", logger="nemo_aligner"):
        log_ignored_keys(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and any("model.megatron_amp_O2=True" in m and "ignored" in m for m in lines)


# ------------------------------------------------------------------------------------------ import arrows
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.startswith("nemo_aligner")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# package -> the packages of ours it may import (arrows point down; recipes import everything)
ALLOWED = {
    "config": {"config", "models.lora_names"},
    "models": {"models"},
    "data": {"data"},
    "losses": {"losses"},
    "algorithms": {"algorithms", "config", "data", "losses", "models", "rollout", "rewards", "generation"},
    "parallel": {"parallel", "models", "losses", "data"},
    "training": {"training", "parallel", "data"},
    "generation": {"generation", "models", "parallel", "losses", "data", "config"},
    "rollout": {"rollout", "generation", "models", "losses", "data"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    allowed = ALLOWED[package]
    bad = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for module in _imports(path):
            target = module.removeprefix("nemo_aligner.")
            if not any(target == a or target.startswith(a + ".") or _layer(module) == a for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_recipes_do_not_import_each_other():
    bad = []
    for path in sorted((PACKAGE / "recipes").glob("*.py")):
        for module in _imports(path):
            if module.startswith("nemo_aligner.recipes.") and module != "nemo_aligner.recipes.skeleton":
                bad.append(f"{path.name} imports {module}")
    assert not bad, "\n".join(bad)


def test_nothing_outside_recipes_imports_recipes():
    bad = [f"{path.relative_to(ROOT)} imports {module}" for path in sorted(PACKAGE.rglob("*.py"))
           if "recipes" not in path.parts for module in _imports(path) if module.startswith("nemo_aligner.recipes")]
    assert not bad, "\n".join(bad)
