"""A DPO run writes only what the user asked for and never the same state twice.

- A resumed run that has no step left writes no checkpoint and no hf/ export again (the files keep
  their bytes and times); one that trains further writes both.
- exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false: no hf/ export.
- A model read from a checkpoint is built on the meta device: its random initialisation never runs.
(The validation reference pass: tests/test_shared_prompt.py::test_validation_reference_covers_only_what_validation_reads.)
"""

import pytest
import torch

from nemo_aligner.recipes.dpo import run_dpo
from tests.helpers import FAST, dpo_config

COMMON = [*FAST, "exp_manager.create_tensorboard_logger=false", "trainer.dpo.limit_val_batches=0"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stamps(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_resumed_writes_nothing_again_and_a_longer_one_does(tmp_path):
    run_dpo(dpo_config(tmp_path, *COMMON, "trainer.dpo.max_steps=2"))
    checkpoints, hf = _stamps(tmp_path / "checkpoints"), _stamps(tmp_path / "hf")
    assert checkpoints and hf
    result = run_dpo(dpo_config(tmp_path, *COMMON, "trainer.dpo.max_steps=2"))
    assert result["resumed"] and result["steps"] == 2
    assert _stamps(tmp_path / "checkpoints") == checkpoints and _stamps(tmp_path / "hf") == hf
    run_dpo(dpo_config(tmp_path, *COMMON, "trainer.dpo.max_steps=3"))
    assert _stamps(tmp_path / "hf") != hf and any(p.parts[0] == "step_00000003"
                                                  for p in _stamps(tmp_path / "checkpoints"))


def test_no_export_when_save_nemo_on_train_end_is_false(tmp_path):
    result = run_dpo(dpo_config(tmp_path, *COMMON, "trainer.dpo.max_steps=1",
                                "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false",
                                "exp_manager.create_checkpoint_callback=false"))
    assert result["hf_dir"] is None and not (tmp_path / "hf").exists() and not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_is_loaded_without_random_initialisation(tmp_path, monkeypatch):
    from nemo_aligner.models import gpt
    from nemo_aligner.models.hf import load_pretrained, save_pretrained

    model = gpt.GPTModel(gpt.GPTConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2))
    save_pretrained(model, tmp_path / "m", model_type="llama")
    devices = []
    monkeypatch.setattr(gpt.GPTModel, "init_weights", lambda self: devices.append(self.embedding.weight.device.type))
    loaded = load_pretrained(tmp_path / "m")
    assert devices == ["meta"]  # initialisation only ever saw meta tensors (no data, no time)
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)
