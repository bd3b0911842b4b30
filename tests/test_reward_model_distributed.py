"""Reward models under tensor, data and pipeline parallel on CPU (gloo, 2 ranks): the recipe's metrics for 3 steps and
its Hugging Face export equal the single-process run's, and the scoring API, laid out like a policy
(`ParallelRun.wrap_frozen`), gives the single-process scores. Two workers are started once and run every
layout in turn (a fresh process group each)."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.helpers import ROOT, compose
from tests.test_distributed import _free_ports

RM_YAML = ROOT / "nemo_aligner/conf/training_rm.yaml"
# name -> overrides; every layout keeps the single-process global batch (8 pairs)
LAYOUTS = {"tp2": ["model.tensor_model_parallel_size=2"],
           "tp2_sp": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"],
           "dp2": [],
           "pp2": ["model.pipeline_model_parallel_size=2"]}
STEPS = 3
TIMING_KEYS = ("train/step_time", "train/tokens_per_sec")
# rank -> which of SEQUENCES it scores under dp2 (unequal counts: the short rank repeats a micro-batch)
DP_SHARES = {0: [0, 2, 3, 5, 6], 1: [1, 4]}


def overrides(data_dir, world: int) -> list[str]:
    return ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.micro_batch_size=2", "model.global_batch_size=8",
            f"trainer.devices={world}", f"trainer.rm.max_steps={STEPS}", "model.optim.sched.max_steps=10",
            "trainer.rm.val_check_interval=3", "model.center_rewards_coefficient=0.01",
            "exp_manager.create_checkpoint_callback=false", "exp_manager.progress_bar=false",
            "exp_manager.create_tensorboard_logger=false",
            f"model.data.data_prefix.train=[{data_dir / 'train.jsonl'}]",
            f"model.data.data_prefix.validation=[{data_dir / 'val.jsonl'}]"]


def sequences() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(5, 400, (n,), generator=generator).tolist() for n in (9, 4, 17, 1, 12, 6, 9)]


def run(log_dir, data_dir, world, extra):
    from nemo_aligner.config import RMRunConfig
    from nemo_aligner.recipes.rm import run_rm

    return run_rm(compose(RM_YAML, RMRunConfig, log_dir, *overrides(data_dir, world), *extra))


def score_like_a_policy(hf_dir, data_dir, world, extra, rank=0):
    """The scoring API in-process: a policy's run (a causal LM ending in log-probs), the reward model laid out
    like it; this rank's share of the sequences (all of them without data parallel)."""
    from nemo_aligner.config import RMRunConfig
    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.models.gpt import GPTConfig, GPTModel
    from nemo_aligner.parallel.mesh import init_parallel
    from nemo_aligner.parallel.run import ParallelRun
    from nemo_aligner.rewards.reward_model import RewardModel

    cfg = compose(RM_YAML, RMRunConfig, data_dir / "unused", *overrides(data_dir, world), *extra)
    parallel = init_parallel(cfg.trainer, cfg.model)
    torch.manual_seed(0)
    policy = GPTModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                num_query_groups=2, vocab_size=400))
    run_ = ParallelRun(parallel, policy, LogProbHead(), max_row_tokens=32)  # pipeline stages: rows of 32 tokens
    scorer = RewardModel.load(hf_dir, run=run_, micro_batch_size=2)
    share = DP_SHARES[parallel.dp_rank] if parallel.dims.dp > 1 else list(range(len(sequences())))
    return share, scorer.score([sequences()[i] for i in share])


def _worker(rank: int, root: str, ports: dict):
    torch.set_num_threads(1)
    import nemo_aligner.training.logging as logging_module

    logging_module.plot_curves = lambda *args, **kwargs: None
    root = Path(root)
    for name, extra in LAYOUTS.items():
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(ports[name]))
        run(root / name, root / "data", 2, extra)
        share, scores = score_like_a_policy(root / "single/hf", root / "data", 2, extra, rank)
        (root / name / f"scores_{rank}.json").write_text(json.dumps({"share": share, "scores": scores.tolist()}))
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_distributed")
    data = root / "data"
    data.mkdir()
    demo = ROOT / "nemo_aligner/demo/data"  # NeMo-Aligner comparison files: two lines per pair
    (data / "train.jsonl").write_text("".join((demo / "rm_comparisons_train.jsonl").read_text().splitlines(True)[:48]))
    # 5 validation pairs: dp ranks get unequal micro-batch counts and the last micro-batch is partial
    (data / "val.jsonl").write_text("".join((demo / "rm_comparisons_val.jsonl").read_text().splitlines(True)[:10]))
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
            run(root / "single", data, 1, [])
            _, scores = score_like_a_policy(root / "single/hf", data, 1, [])
            (root / "single/scores.json").write_text(json.dumps(scores.tolist()))
    finally:
        torch.set_num_threads(threads)
    t1 = time.perf_counter()
    mp.spawn(_worker, args=(str(root), dict(zip(LAYOUTS, _free_ports(len(LAYOUTS))))), nprocs=2, join=True)
    print(f"single-process run {t1 - t0:.1f}s, distributed runs {time.perf_counter() - t1:.1f}s")
    return root


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reward_model_training_equals_single_process(runs, layout):
    want, got = read(runs / "single/metrics.jsonl"), read(runs / layout / "metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3] and "val/acc" in want[-1]
    assert [r["step"] for r in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert set(g) == set(w), f"{layout}: metric names differ: {set(g) ^ set(w)}"
        for key, value in w.items():
            if key not in TIMING_KEYS and isinstance(value, (int, float)):
                assert math.isclose(g[key], value, rel_tol=1e-5, abs_tol=1e-5), \
                    f"{layout} step {w['step']} {key}: {g[key]} != {value} (single process)"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reward_model_export_equals_single_process(runs, layout):
    want_dir, got_dir = runs / "single/hf", runs / layout / "hf"
    config = json.loads((got_dir / "config.json").read_text())
    assert config == json.loads((want_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    want, got = load_file(want_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert sorted(got) == sorted(want) and "score.weight" in got
    for name, tensor in want.items():
        # 3 Adam steps turn rounding-level differences in near-zero gradients into ~1e-5 weight differences
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=5e-5, msg=lambda m: f"{layout} {name}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scoring_api_laid_out_like_the_policy_equals_single_process(runs, layout):
    want = json.loads((runs / "single/scores.json").read_text())
    for rank in (0, 1):
        got = json.loads((runs / layout / f"scores_{rank}.json").read_text())
        assert len(got["scores"]) == len(got["share"])
        for index, score in zip(got["share"], got["scores"]):
            assert score == pytest.approx(want[index], abs=1e-5), (layout, rank, index)
