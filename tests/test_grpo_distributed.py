"""GRPO under data and tensor parallel equals one process: two steps on gloo with the built-in sampler and
the same seeds (each dp rank generates its share of the prompts with the global prompt positions' seeds;
tp ranks run the sharded policy and sample identical tokens), so rewards, advantages, losses, gradient
norms and the completions' lengths match the single-process run."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_distributed import _free_ports
from tests.test_grpo import grpo_config

LAYOUTS = {"dp2": ["trainer.devices=2"], "tp2": ["trainer.devices=2", "model.tensor_model_parallel_size=2"]}
COMMON = ["model.num_query_groups=2", "trainer.grpo.save_interval=0", "exp_manager.create_checkpoint_callback=false",
          "model.grpo.beta=0.04", "model.optim.lr=1e-2", "model.grpo.reward_weights=null",
          # a reward random completions often earn, so both steps have unequal rewards in their groups
          "model.grpo.reward_funcs=[{fn: format_reward, name: letter, kwargs: {pattern: '.*[a-m]'}}]"]
TIMING = ("time/", "tokens_per_sec", "step_time")


def _run(log_dir, *overrides):
    from nemo_aligner.recipes.grpo import run_grpo

    torch.set_num_threads(1)
    return run_grpo(grpo_config(log_dir, *COMMON, *overrides))


def _worker(rank: int, root: str, ports: dict):
    import nemo_aligner.training.logging as logging_module

    logging_module.plot_curves = lambda *args, **kwargs: None  # a spawned process of its own: nothing leaks
    for name, overrides in LAYOUTS.items():
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(ports[name]))
        _run(Path(root) / name, *overrides)
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def _metrics(log_dir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_distributed")
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:  # the PNG takes seconds and is not what this checks
            patch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
            _run(root / "single")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(str(root), dict(zip(LAYOUTS, _free_ports(len(LAYOUTS))))), nprocs=2, join=True)
    return root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grpo_under_parallelism_equals_one_process(runs, layout):
    want, got = _metrics(runs / "single"), _metrics(runs / layout)
    assert [r["step"] for r in got] == [1, 2]
    for g, w in zip(got, want):
        assert set(g) == set(w), set(g) ^ set(w)
        for key, value in w.items():
            if isinstance(value, float) and not math.isnan(value):
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{layout} step {w['step']}: {key}"
    assert want[-1]["train/grad_norm"] > 0 and want[-1]["train/kl"] > 0  # the comparison is not of zeros
