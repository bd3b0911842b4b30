"""PPO under data parallel (2 processes, gloo) equals one process: the same rollouts (each rank samples its
share with the seeds one process uses), the same targets (rewards, GAE and whitening over the gathered
batch), the same update of actor and critic (FSDP over dp for actor, reference, reward model and critic),
so two PPO steps' metrics and the exported hf/ and critic/ match the single-process run."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.helpers import read_metrics
from tests.test_ppo import make_hf_reward_model

STEPS = ["trainer.ppo.max_steps=2", "model.ppo.num_ppo_epochs=2", "model.ppo.kl_coef=0.05",
         "exp_manager.create_checkpoint_callback=false"]
SKIP = ("time/", "tokens_per_sec", "step_time", "train/eps")


def _run(log_dir, rm_folder, world: int):
    from tests.test_ppo import run

    return run(log_dir, rm_folder, f"trainer.devices={world}", *STEPS)


def _worker(rank: int, root: str, port: int):
    import nemo_aligner.training.logging as logging_module

    torch.set_num_threads(1)
    logging_module.plot_curves = lambda *args, **kwargs: None  # a worker process of its own: nothing leaks
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        _run(Path(root) / "dp2", Path(root) / "rm", 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_dp")
    make_hf_reward_model(root / "rm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:  # the PNG takes seconds and is not what this checks
            patch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
            _run(root / "single", root / "rm", 1)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(str(root), _free_port()), nprocs=2, join=True)
    return root


def test_dp2_equals_a_single_process_for_two_ppo_steps(runs):
    single, dp2 = read_metrics(runs / "single"), read_metrics(runs / "dp2")
    assert [r["step"] for r in dp2] == [r["step"] for r in single] == [1, 2]
    assert single[-1]["train/objective/kl"] > 0  # step 2: the policy has moved away from the reference
    for want, got in zip(single, dp2):
        for key, value in want.items():
            if any(s in key for s in SKIP) or not isinstance(value, float):
                continue
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (want["step"], key)
    for folder in ("hf", "critic"):
        a, b = load_file(runs / "single" / folder / "model.safetensors"), load_file(runs / "dp2" / folder / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), f"{folder}/{name}"
