"""Real runs (issue 19): real defaults and the demo preset; preemption by signals and trainer.max_time with
real processes (stop at step k, rerun, the metrics equal a straight run); the non-finite guard; the log dir
(identity and refusal, settings that may change, moving an old run aside, the lock, finished runs, complete
checkpoints); LoRA determinism from a checkpoint; user errors (one message, no traceback, before any
expensive work); and no work nobody asked for (validation off, the test split)."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.config import DPORunConfig, SFTRunConfig, load_config
from nemo_aligner.config.presets import is_demo_run, with_preset
from nemo_aligner.data.rows import DataError
from nemo_aligner.recipes.dpo import run_dpo
from nemo_aligner.recipes.skeleton import main_entry
from nemo_aligner.training.checkpoint import Checkpointer, is_complete
from nemo_aligner.training.guards import NonFiniteError
from nemo_aligner.training.optim import lr_at, schedule_warning
from nemo_aligner.training.run_dir import acquire_lock, release_lock
from tests.helpers import DEMO_DIR, DEMO_TRAIN, DEMO_VAL, DPO_YAML, FAST, ROOT, assert_same_trajectory, comparable, dpo_config, read_metrics

SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_dpo.py"
QUIET = ["exp_manager.create_tensorboard_logger=false"]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Tiny models lose from intra-op threads on shared cores; the curves PNG is test_training_logging's."""
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path, rows, start=0):
    lines = DEMO_TRAIN.read_text().splitlines(keepends=True)[start:start + rows]
    path.write_text("".join(lines))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ 1. defaults
def test_the_schemas_defaults_are_nemo_aligners_real_model_values():
    dpo, sft = load_config({}, DPORunConfig), load_config({}, SFTRunConfig)
    optim, sched = dpo.model.optim, dpo.model.optim.sched
    assert (optim.lr, optim.weight_decay, list(optim.betas)) == (9e-6, 0.1, [0.9, 0.98])
    assert (sched.name, sched.warmup_steps, sched.constant_steps, sched.min_lr) == ("CosineAnnealing", 10, 1000, 9e-7)
    assert (dpo.model.encoder_seq_length, dpo.trainer.dpo.max_epochs, dpo.model.micro_batch_size,
            dpo.model.global_batch_size, dpo.model.dpo.ref_policy_kl_penalty) == (4096, 1, 1, 64, 0.2)
    # SFT: NeMo-Aligner's gpt_sft.yaml
    assert (sft.model.optim.lr, sft.model.optim.weight_decay, sft.model.global_batch_size) == (3e-5, 0.01, 128)
    assert (sft.model.optim.sched.name, sft.trainer.sft.val_check_interval) == ("CosineAnnealing", 100)


def test_the_demo_preset_applies_only_to_a_run_without_checkpoint_and_data():
    assert is_demo_run({}) and is_demo_run({"trainer": {"dpo": {"max_steps": 3}}})
    assert not is_demo_run({"pretrained_checkpoint": {"restore_from_path": "/m"}})
    assert not is_demo_run({"model": {"data": {"data_prefix": {"train": ["t.jsonl"]}}}})
    base = OmegaConf.load(DPO_YAML)
    base.pop("defaults"), base.pop("hydra")
    demo = load_config(with_preset(base, DEMO_DIR / DPO_YAML.name, ["++model.optim.lr=0.5", "trainer.dpo.max_steps=7"]),
                       DPORunConfig)
    assert (demo.model.optim.lr, demo.trainer.dpo.max_steps, demo.model.hidden_size) == (0.5, 7, 128)  # overrides win
    assert load_config(base, DPORunConfig).model.optim.lr == 9e-6  # the shipped YAML changes no default


def test_a_schedule_that_does_not_fit_is_shown_with_its_lr_curve():
    text = schedule_warning(base_lr=9e-6, name="CosineAnnealing", max_steps=100, warmup_steps=10,
                            constant_steps=1000, min_lr=9e-7)
    assert "constant_steps=1000 does not fit in max_steps=100" in text
    assert "step 10: 9e-06, step 11: 9e-07" in text and "constant_steps=0" in text
    assert "never reaches" in schedule_warning(base_lr=1e-5, name="linear", max_steps=5, warmup_steps=10)
    assert schedule_warning(base_lr=9e-6, name="CosineAnnealing", max_steps=2000, warmup_steps=10,
                            constant_steps=1000, min_lr=9e-7) is None


# ------------------------------------------------------------------------------------------ 2. preemption
STEPS = 24
# A run on data from the command line (so the schema's defaults, no demo preset) with 8 micro-batches per step,
# long enough to be signalled mid-run.
RESUMABLE = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
             "model.num_query_groups=1", "model.micro_batch_size=1", "model.global_batch_size=8",
             "model.encoder_seq_length=128", f"trainer.dpo.max_steps={STEPS}", "trainer.dpo.max_epochs=10",
             "trainer.dpo.save_interval=4", "trainer.dpo.val_check_interval=8", "trainer.dpo.limit_val_batches=1",
             "model.optim.lr=1e-3", "model.optim.sched.warmup_steps=2", "model.optim.sched.constant_steps=0",
             "model.optim.sched.min_lr=1e-4", "exp_manager.progress_bar=false", *QUIET]


@pytest.fixture(scope="module")
def preemption(tmp_path_factory):
    """(data overrides, the straight run's metrics)."""
    root = tmp_path_factory.mktemp("preemption")
    data = [f"model.data.data_prefix.train=[{_rows(root / 'train.jsonl', 64)}]",
            f"model.data.data_prefix.validation=[{_rows(root / 'val.jsonl', 8, start=64)}]"]
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
        run_dpo(dpo_config(root / "straight", *RESUMABLE, *data, demo=False))
    return data, [comparable(r) for r in read_metrics(root / "straight")]


def _cli(log_dir, *args, driver: str | None = None) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT)] if driver is None else [sys.executable, "-c", driver, str(SCRIPT)]
    return subprocess.Popen([*command, f"exp_manager.explicit_log_dir={log_dir}", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(log_dir, step: int, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{proc.stdout.read()}")
        rows = read_metrics(log_dir) if (log_dir / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.01)
    pytest.fail(f"no step {step} within {timeout}s")


def _assert_stopped_then_resumes_exactly(log_dir, data, straight, out):
    rows = read_metrics(log_dir)
    stopped_at = rows[-1]["step"]
    assert 1 <= stopped_at < STEPS, out
    latest = Checkpointer(log_dir / "checkpoints").latest()
    assert latest is not None and Checkpointer.step_of(latest) == stopped_at, out  # saved at the step it stopped
    assert not (log_dir / "hf").exists() and not (log_dir / "finished.json").exists()  # no export
    result = run_dpo(dpo_config(log_dir, *RESUMABLE, *data, demo=False))
    assert result["resumed"] and result["steps"] == STEPS
    assert_same_trajectory(straight, read_metrics(log_dir), STEPS)
    return stopped_at


# The script, each optimiser step made 0.1 s longer (sleeping changes no number), so a run of 24 steps outlasts
# a 1 s trainer.max_time and a signal sent after step 3 however fast the machine is.
SLOW = """
import runpy, sys, time
from nemo_aligner.training.loop import Trainer
real_step = Trainer.train_step
def train_step(self, items):
    time.sleep(0.1)
    return real_step(self, items)
Trainer.train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigusr1_saves_after_the_step_exits_75_and_the_rerun_continues_the_trajectory(preemption, tmp_path):
    data, straight = preemption
    proc = _cli(tmp_path, *RESUMABLE, *data, driver=SLOW)
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out
    assert "stopped by SIGUSR1 after step" in out and "Rerun the same command to continue" in out
    assert _assert_stopped_then_resumes_exactly(tmp_path, data, straight, out) >= 3


DOUBLE_SIGNAL = """
import os, runpy, signal, sys
import torch.distributed.checkpoint as dcp
from nemo_aligner.training.loop import Trainer
real_step, real_save = Trainer.train_step, dcp.save
def train_step(self, items):
    out = real_step(self, items)
    if self.state.step + 1 == 6:  # the first SIGTERM arrives during step 6: the loop finishes it, then saves
        os.kill(os.getpid(), signal.SIGTERM)
    return out
def save(state, checkpoint_id):
    real_save(state, checkpoint_id=checkpoint_id)
    if checkpoint_id.endswith("step_00000006.tmp"):  # the second SIGTERM: shards written, checkpoint not complete
        os.kill(os.getpid(), signal.SIGTERM)
Trainer.train_step, dcp.save = train_step, save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_second_signal_during_the_save_leaves_the_previous_checkpoint(preemption, tmp_path):
    data, straight = preemption
    proc = _cli(tmp_path, *RESUMABLE, *data, driver=DOUBLE_SIGNAL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGTERM, out  # the second signal ends the process at once
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    assert [Checkpointer.step_of(p) for p in checkpoints.complete()] == [4]  # step 6 never became complete
    result = run_dpo(dpo_config(tmp_path, *RESUMABLE, *data, demo=False))
    assert result["resumed"]
    assert_same_trajectory(straight, read_metrics(tmp_path), STEPS, same_keys=False)


def test_max_time_stops_like_a_signal_and_the_rerun_continues(preemption, tmp_path):
    data, straight = preemption
    proc = _cli(tmp_path, *RESUMABLE, *data, "trainer.max_time=00:00:00:01", driver=SLOW)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out
    assert "stopped by trainer.max_time after step" in out
    _assert_stopped_then_resumes_exactly(tmp_path, data, straight, out)


# ------------------------------------------------------------------------------------------ 3. non-finite
def test_a_huge_lr_stops_naming_the_step_and_metric_and_writes_nothing_non_finite(tmp_path):
    cfg = dpo_config(tmp_path, *FAST, *QUIET, "trainer.dpo.max_steps=6", "trainer.dpo.save_interval=1",
                     "model.optim.lr=1e12", "model.optim.sched.warmup_steps=0", "model.optim.sched.min_lr=0")
    with pytest.raises(NonFiniteError, match=r"step 2: train/loss = nan.*Lower model\.optim\.lr \(now 1e\+12\).*"
                                             r"resumes from .*step_00000001"):
        run_dpo(cfg)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    assert [Checkpointer.step_of(p) for p in checkpoints.complete()] == [1]
    assert not (tmp_path / "hf").exists()


def test_pruning_never_removes_the_newest_finite_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints = Checkpointer(tmp_path, save_top_k=1)
    for step, value, finite in ((1, 0.5, True), (2, 0.7, True), (3, None, False)):  # 3: written by something else
        checkpoints.save(step, model, optimizer, {"consumed_samples": step, "monitor_value": value, "finite": finite})
    assert [Checkpointer.step_of(p) for p in checkpoints.complete()] == [1, 2, 3]  # best, newest finite, latest
    assert Checkpointer.step_of(checkpoints.latest()) == 2  # where a resume starts


def test_a_dead_gradient_is_warned_about(tmp_path, caplog):
    cfg = dpo_config(tmp_path, *FAST, *QUIET, "trainer.dpo.max_steps=7", "model.optim.lr=1000",
                     "model.optim.sched.warmup_steps=0", "model.optim.sched.min_lr=0",
                     "exp_manager.create_checkpoint_callback=false")
    with caplog.at_level("WARNING", logger="nemo_aligner"):
        run_dpo(cfg)
    rows = read_metrics(tmp_path)
    assert [r["train/grad_norm"] for r in rows[3:]] == [0.0] * 4 and rows[-1]["train/loss"] > 0.1
    assert "the gradient norm has been exactly 0 for 3 steps (steps 4-6)" in caplog.text


# ------------------------------------------------------------------------------------------ 4. the log dir
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Two different training sets of 16 pairs and a validation set of 8 (2 steps per epoch)."""
    root = tmp_path_factory.mktemp("small")
    files = {name: _rows(root / f"{name}.jsonl", rows, start=start)
             for name, rows, start in (("a", 16, 0), ("b", 16, 100), ("val", 8, 200))}
    return {name: [f"model.data.data_prefix.train=[{files[name]}]",
                   f"model.data.data_prefix.validation=[{files['val']}]"] for name in ("a", "b")}


def _two_step(log_dir, data, *extra):
    return dpo_config(log_dir, *FAST, *QUIET, *data, "trainer.dpo.max_steps=2", "trainer.dpo.save_interval=1",
                      "exp_manager.checkpoint_callback_params.save_top_k=-1", *extra)


def test_resuming_another_runs_checkpoint_is_refused_naming_what_differs(tmp_path, small_data):
    run_dpo(_two_step(tmp_path, small_data["a"], "trainer.dpo.max_steps=1"))
    caches = sorted((tmp_path / "ref_logps").iterdir())
    for data, extra, what in ((small_data["b"], [], r"data\.train: "),
                              (small_data["a"], ["model.hidden_size=48", "model.ffn_hidden_size=96"],
                               r"architecture\.hidden_size: 32 -> now 48"),
                              (small_data["a"], ["model.dpo.ref_policy_kl_penalty=0.5"],
                               r"loss\.beta: 0\.2 -> now 0\.5")):
        with pytest.raises(ValueError, match=what) as err:
            run_dpo(_two_step(tmp_path, data, *extra))
        message = str(err.value)
        assert "was written by a different run" in message and "It was made from:" in message
        assert "exp_manager.explicit_log_dir=<new folder>" in message and "resume_if_exists=false" in message
    assert sorted((tmp_path / "ref_logps").iterdir()) == caches  # refused before any reference pass of its own


def test_optimiser_settings_may_change_on_resume_and_each_change_is_logged(tmp_path, caplog, small_data):
    sched = ["model.optim.sched.max_steps=4", "model.optim.sched.warmup_steps=1", "model.optim.sched.min_lr=1e-4"]
    run_dpo(_two_step(tmp_path, small_data["a"], *sched))
    with caplog.at_level("INFO", logger="nemo_aligner"):
        result = run_dpo(_two_step(tmp_path, small_data["a"], *sched, "trainer.dpo.max_steps=4", "model.optim.lr=1e-3",
                                   "trainer.dpo.gradient_clip_val=0.5"))
    assert result["resumed"]
    for change in ("model.optim.lr: 0.003 -> 0.001", "trainer.dpo.max_steps: 2 -> 4",
                   "trainer.dpo.gradient_clip_val: 1.0 -> 0.5"):
        assert f"resuming with a changed setting: {change}" in caplog.text
    rows = read_metrics(tmp_path)  # train/lr of step k is the lr of update k + 1: lr_at(k)
    expected = lr_at(3, base_lr=1e-3, name="CosineAnnealing", max_steps=4, warmup_steps=1, constant_steps=0,
                     min_lr=1e-4)
    assert rows[2]["train/lr"] == pytest.approx(expected, rel=1e-12)  # the new lr, on the schedule, from step 3


def test_resume_if_exists_false_moves_the_old_run_aside(tmp_path, small_data):
    run_dpo(_two_step(tmp_path, small_data["a"]))
    first = (tmp_path / "metrics.jsonl").read_text()
    run_dpo(_two_step(tmp_path, small_data["a"], "exp_manager.resume_if_exists=false", "trainer.dpo.max_steps=1"))
    (moved,) = (tmp_path / "previous_runs").iterdir()
    assert (moved / "metrics.jsonl").read_text() == first  # untouched, with its checkpoints and export
    assert [Checkpointer.step_of(p) for p in Checkpointer(moved / "checkpoints").complete()] == [1, 2]
    assert (moved / "hf/config.json").is_file()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert [Checkpointer.step_of(p) for p in Checkpointer(tmp_path / "checkpoints").complete()] == [1]


def test_a_lock_keeps_a_second_live_run_out(tmp_path, small_data):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from nemo_aligner.training.run_dir import acquire_lock; "
                               f"acquire_lock(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"is in use by another live run \(host .*, pid {holder.pid}, started"):
            run_dpo(_two_step(tmp_path, small_data["a"]))
    finally:
        holder.kill()
        holder.wait()
    acquire_lock(tmp_path)  # the kernel released it with the process
    release_lock(tmp_path)


def test_rerunning_a_finished_run_does_nothing_and_says_so(tmp_path, caplog, small_data):
    run_dpo(_two_step(tmp_path, small_data["a"]))
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".nemo_aligner.lock"}
    with caplog.at_level("INFO", logger="nemo_aligner"):
        result = run_dpo(_two_step(tmp_path, small_data["a"]))
    assert result["nothing_to_do"] and result["steps"] == 2
    assert "nothing to do:" in caplog.text and "finished at step 2" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in files} == files  # no re-save, no re-export, no new metrics


def test_a_checkpoint_counts_as_complete_only_with_all_its_files(tmp_path, small_data):
    run_dpo(_two_step(tmp_path, small_data["a"]))
    step1, step2 = Checkpointer(tmp_path / "checkpoints").complete()
    (shard,) = step2.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:10])  # a torn shard
    assert not is_complete(step2) and Checkpointer(tmp_path / "checkpoints").latest() == step1
    shard.unlink()  # a folder that looks complete but holds no shards
    assert not is_complete(step2)
    result = run_dpo(_two_step(tmp_path, small_data["a"]))  # resumes from step 1 and writes step 2 again
    assert result["resumed"] and is_complete(step2) and result["steps"] == 2


# ------------------------------------------------------------------------------------------ 5. LoRA
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import transformers

    from nemo_aligner.data.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("llama")
    tok = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=tok.vocab_size, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    return folder


def test_two_identical_lora_runs_from_a_checkpoint_are_identical(tmp_path, tiny_llama, small_data):
    lora = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[all]",
            "model.peft.lora_tuning.adapter_dim=4", "model.peft.lora_tuning.row_init_method=normal",
            f"pretrained_checkpoint.restore_from_path={tiny_llama}", "exp_manager.create_checkpoint_callback=false"]
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 7 + ord(name))  # whatever the RNG held before, model.seed decides
        run_dpo(_two_step(tmp_path / name, small_data["a"], *lora))
        runs.append([comparable(r) for r in read_metrics(tmp_path / name)])
    assert runs[0] == runs[1] and runs[0][0]["train/grad_norm"] > 0


def test_adapter_init_depends_only_on_the_seed_and_the_module_name():
    from nemo_aligner.config.sections import LoraConfig
    from nemo_aligner.models.gpt import GPTConfig, GPTModel
    from nemo_aligner.models.lora import apply_lora
    from nemo_aligner.parallel.pipeline import prune_to_stage

    def adapters(seed, prune=False, rng=0):
        torch.manual_seed(rng)
        model = GPTModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                   vocab_size=64))
        if prune:  # the second pipeline stage of two: layer 1 only
            prune_to_stage(model, range(1, 2), is_first=False, is_last=True)
        apply_lora(model, LoraConfig(target_modules=["all"], adapter_dim=4, row_init_method="normal"), seed=seed)
        return {k: v for k, v in model.state_dict().items() if ".lora_" in k}

    whole, stage = adapters(1234), adapters(1234, prune=True, rng=99)
    assert stage and all(torch.equal(tensor, whole[name]) for name, tensor in stage.items())
    other = adapters(1235)
    assert not torch.equal(other["layers.1.self_attention.q_proj.lora_A.weight"],
                           whole["layers.1.self_attention.q_proj.lora_A.weight"])


# ------------------------------------------------------------------------------------------ 6. user errors
def _raw(*overrides):
    base = OmegaConf.load(DPO_YAML)
    base.pop("defaults"), base.pop("hydra")
    return with_preset(base, DEMO_DIR / DPO_YAML.name, [*FAST, *QUIET, "trainer.dpo.max_steps=2", *overrides])


def _entry(capsys, *overrides) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main_entry(_raw(*overrides), DPORunConfig, run_dpo)
    return exit_info.value.code, capsys.readouterr().err


def _jsonl(path, rows, raw: bytes | None = None):
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _packed_with_a_foreign_token(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    from nemo_aligner.data.dataset import TokenizeSettings
    from nemo_aligner.data.layout import pack_examples
    from nemo_aligner.data.preference.dataset import PreferenceDataset
    from nemo_aligner.data.preference.packed_file import write_packed_file
    from nemo_aligner.data.tokenizer import Tokenizer

    tok = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    dataset = PreferenceDataset.from_files([_rows(tmp_path / "pairs.jsonl", 16)], tok, TokenizeSettings(seq_length=96))
    path = tmp_path / "packed.safetensors"
    write_packed_file(path, dataset, pack_examples(dataset, 192, "first_fit_decreasing", 0), pack_size=192,
                      algorithm="first_fit_decreasing", seed=0, seq_length=96, tokenizer_fingerprint=tok.fingerprint())
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    arrays = load_file(str(path))
    arrays["input_ids"][40] = 1_000_000
    save_file(arrays, str(path), metadata=metadata)
    return path


def _user_error_cases(tmp_path, tiny_llama):
    pair = {"prompt": "Q: What color is the sky?\nA:", "chosen": " Blue.", "rejected": " Red."}
    same = _jsonl(tmp_path / "identical.jsonl", [{**pair, "rejected": pair["chosen"]}] * 16)
    wizard = _jsonl(tmp_path / "wizard.jsonl", [{"prompt": [{"role": "wizard", "content": "hi"}],
                                                  "chosen": [{"role": "assistant", "content": "a"}],
                                                  "rejected": [{"role": "assistant", "content": "b"}]}])
    latin = _jsonl(tmp_path / "latin1.jsonl", [], raw=(json.dumps(pair) + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for file in tiny_llama.iterdir():
        data = file.read_bytes()
        (truncated / file.name).write_bytes(data[:len(data) // 2] if file.name == "model.safetensors" else data)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    small = _rows(tmp_path / "small.jsonl", 3)
    cut_gzip = tmp_path / "cut.jsonl.gz"
    cut_gzip.write_bytes(gzip.compress(_rows(tmp_path / "many.jsonl", 400).read_bytes())[:300])
    return {
        "identical": ([f"model.data.data_prefix.train=[{same}]"],
                      r"16 of 16 pairs have the same chosen and rejected response \(.*identical\.jsonl:1, "),
        "wizard": ([f"model.data.data_prefix.train=[{wizard}]"],
                   r"wizard\.jsonl:1: prompt\[0\] has unknown role 'wizard'; expected one of "
                   r"\['system', 'user', 'assistant', 'tool'\]"),
        "non_utf8": ([f"model.data.data_prefix.train=[{latin}]"], r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9"),
        "directory": ([f"model.data.data_prefix.train=[{tmp_path}]"],
                      r"model\.data\.data_prefix\.train: .* is a directory without data: expected a Hugging "
                      r"Face dataset folder"),
        "missing_checkpoint": ([f"pretrained_checkpoint.restore_from_path={tmp_path / 'nowhere'}"],
                               r"pretrained_checkpoint\.restore_from_path=.*nowhere: not found; expected a Hugging "
                               r"Face model folder"),
        "truncated_safetensors": ([f"pretrained_checkpoint.restore_from_path={truncated}"],
                                  r"truncated/model\.safetensors: not a readable safetensors file"),
        "foreign_token": ([f"model.data.data_prefix.train=[{_packed_with_a_foreign_token(tmp_path)}]",
                           "model.data.data_prefix.validation=null", "model.data.data_impl=packed_jsonl",
                           "model.encoder_seq_length=192", "model.micro_batch_size=1", "model.global_batch_size=1"],
                          r"packed\.safetensors: pair \d+ \(source row \d+\) holds token id 1000000, outside the "
                          r"tokenizer's vocabulary of 400"),
        "wandb": (["exp_manager.create_wandb_logger=true"], r"create_wandb_logger=true needs Weights & Biases"),
        "blend": ([f"model.data.data_prefix.train=[0.7,{small},0.3]"],
                  r"model\.data\.data_prefix\.train=.*a blend lists weights and paths alternating"),
        "corrupt_gzip": ([f"model.data.data_prefix.train=[{cut_gzip}]"], r"cut\.jsonl\.gz: gzip data corrupt or cut"),
        "too_small": ([f"model.data.data_prefix.train=[{small}]"],
                      r"train data has 3 items but model\.global_batch_size=8"),
        "unwritable_log_dir": ([f"exp_manager.explicit_log_dir={blocker / 'run'}"],
                               r"exp_manager\.explicit_log_dir=.*a_file/run: cannot write there"),
        "non_finite": (["model.optim.lr=1e12", "model.optim.sched.warmup_steps=0", "model.optim.sched.min_lr=0"],
                       r"step 2: train/loss = nan"),
    }


USER_ERRORS = ["identical", "wizard", "non_utf8", "directory", "missing_checkpoint", "truncated_safetensors",
               "foreign_token", "wandb", "blend", "corrupt_gzip", "too_small", "unwritable_log_dir", "non_finite"]


def test_every_user_error_is_one_message_without_a_traceback_before_any_expensive_work(tmp_path, tiny_llama,
                                                                                       capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    (tmp_path / "inputs").mkdir()
    cases = _user_error_cases(tmp_path / "inputs", tiny_llama)

    for name in USER_ERRORS:
        overrides, message = cases[name]
        log_dir = tmp_path / name
        code, err = _entry(capsys, f"exp_manager.explicit_log_dir={log_dir}", *overrides)
        assert code == 1, (name, err)
        assert re.search(message, err), (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        if name != "non_finite":  # found before the reference pass (or any other heavy work)
            assert not (log_dir / "ref_logps").exists(), name
    os.environ["NEMO_ALIGNER_TRACEBACK"] = "1"  # the documented switch shows the traceback
    try:
        with pytest.raises(DataError, match="is a directory"):
            main_entry(_raw(f"exp_manager.explicit_log_dir={tmp_path / 'tb'}", *cases["directory"][0]), DPORunConfig,
                       run_dpo)
    finally:
        del os.environ["NEMO_ALIGNER_TRACEBACK"]


def test_some_identical_pairs_are_counted_and_named(tmp_path, caplog):
    from nemo_aligner.data.dataset import TokenizeSettings
    from nemo_aligner.data.preference.dataset import PreferenceDataset
    from nemo_aligner.data.tokenizer import Tokenizer

    rows = [json.loads(line) for line in DEMO_VAL.read_text().splitlines()[:10]]
    for k in (2, 6):
        rows[k]["rejected_response"] = rows[k]["chosen_response"]
    path = _jsonl(tmp_path / "some.jsonl", rows)
    with caplog.at_level("WARNING", logger="nemo_aligner"):
        dataset = PreferenceDataset.from_files([path], Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer"),
                                               TokenizeSettings(seq_length=96), name="model.data.data_prefix.train")
    assert len(dataset) == 10
    assert f"2 of 10 pairs have the same chosen and rejected response ({path}:3, {path}:7)" in caplog.text


def test_the_script_prints_one_line_and_no_hydra_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), f"pretrained_checkpoint.restore_from_path={tmp_path / 'none'}",
                          f"model.data.data_prefix.train=[{DEMO_TRAIN}]", f"exp_manager.explicit_log_dir={tmp_path}"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"error: pretrained_checkpoint.restore_from_path={tmp_path / 'none'}: not found; "
                                  "expected a Hugging Face model folder (config.json + *.safetensors)")
    assert "Traceback" not in out.stdout + out.stderr and "Error executing job" not in out.stdout + out.stderr


# ------------------------------------------------------------------------------------------ 7. no unasked work
def test_no_validation_pass_when_validation_is_off_and_the_test_split_runs_once_at_the_end(tmp_path):
    test_file = _rows(tmp_path / "test.jsonl", 12, start=200)
    result = run_dpo(dpo_config(tmp_path / "run", *FAST, *QUIET, "trainer.dpo.max_steps=2",
                                "trainer.dpo.limit_val_batches=0", f"model.data.data_prefix.test=[{test_file}]"))
    caches = sorted(p.name.split("-")[0] for p in (tmp_path / "run/ref_logps").glob("*.safetensors"))
    assert caches == ["test", "train"]  # no reference pass over the validation split
    rows = read_metrics(tmp_path / "run")
    assert not any(k.startswith("val/") for r in rows for k in r)
    assert [r["step"] for r in rows if "test/loss" in r] == [2]  # once, in the last step's record
    assert result["test"]["loss"] == rows[-1]["test/loss"] and 0 <= rows[-1]["test/acc"] <= 1
    assert np.isfinite(result["test"]["loss"])


def test_the_sbatch_script_asks_for_a_signal_requeues_and_sets_real_settings():
    from nemo_aligner.training.signals import EXIT_STOPPED

    script = ROOT / "examples/slurm/train_gpt_dpo.sbatch"
    text = script.read_text()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    assert f"EXIT_STOPPED={EXIT_STOPPED}" in text and 'scontrol requeue "${SLURM_JOB_ID}"' in text
    assert 'model.optim.lr="${LR}"' in text and 'model.encoder_seq_length="${SEQ_LEN}"' in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
