"""Shared-prompt pairs under tensor and pipeline parallel (CPU, gloo): the prefix-group layout gives the
two-sequence layout's losses, metrics and gradients, and both give the single process's.

Two worker processes run tp2, tp2 with sequence parallel, and pp2 (1F1B, branch and position ids
reaching the second stage as stage kwargs) in turn. For each, padded and packed rows and a weighted
loss family with an SFT term (precomputed reference log-probs): one optimiser step's metric sums, the
global gradient norm and this rank's gradient shards, shared against unshared (1e-5), and both against
one process.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_distributed import _free_ports, forget_meshes

LAYOUTS = {"tp2": dict(tp=2, sp=False, pp=1), "tp2_sp": dict(tp=2, sp=True, pp=1), "pp2": dict(tp=1, sp=False, pp=2)}
LOSSES = ["dpo", "ipo", "rpo_bwd_kl", "simpo"]
V = 64


def _dataset():
    from nemo_aligner.data.preference.dataset import PreferenceDataset
    from nemo_aligner.data.preference.tokenize import TokenizedPair
    from nemo_aligner.data.report import RowReport

    rng = np.random.default_rng(0)
    lengths = [(9, 3, 5), (1, 4, 2), (14, 2, 3), (6, 6, 1), (11, 1, 7), (3, 5, 5), (8, 2, 2), (12, 4, 1)]
    pairs = [TokenizedPair(*(rng.integers(3, V, n, dtype=np.int32) for n in lens), None, None) for lens in lengths]
    dataset = PreferenceDataset(pairs, RowReport(files=["synthetic"], unit="pairs"))
    dataset.ref_chosen = rng.normal(-30, 3, len(pairs)).astype(np.float32)
    dataset.ref_rejected = rng.normal(-30, 3, len(pairs)).astype(np.float32)
    return dataset


def _micro_batches(packed: bool) -> list:
    """Two micro-batches of the 8 pairs (pipeline 1F1B needs at least as many as stages)."""
    return [[[0, 1], [2, 3]], [[4, 5], [6, 7]]] if packed else [[0, 1, 2, 3], [4, 5, 6, 7]]


def _parallel(layout: dict, rank: int | None):
    from nemo_aligner.parallel.mesh import LaunchEnv, Parallel, init_parallel

    if rank is None:
        return Parallel()
    model_cfg = SimpleNamespace(tensor_model_parallel_size=layout["tp"], pipeline_model_parallel_size=layout["pp"],
                                global_batch_size=2, micro_batch_size=1, sequence_parallel=layout["sp"],
                                pipeline_layer_split=None, pipeline_schedule="1f1b")
    env = LaunchEnv(rank=rank, world_size=2, local_rank=rank, master_addr="127.0.0.1",
                    master_port=int(os.environ["MASTER_PORT"]), launcher="torchrun")
    env.export()  # the env:// rendezvous
    return init_parallel(SimpleNamespace(accelerator="cpu", num_nodes=1, devices=2), model_cfg, env)


def one_step(parallel, shared: bool, packed: bool) -> dict:
    """One global batch through the run object: metric sums, the gradient norm and this rank's gradients."""
    from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings
    from nemo_aligner.config.dpo import DPOConfig
    from nemo_aligner.models.gpt import GPTConfig, GPTModel
    from nemo_aligner.parallel.run import ParallelRun

    dataset = _dataset()
    settings = DPOSettings.from_config(DPOConfig(preference_loss=LOSSES, preference_loss_weights=[1, 0.1, 1, 0.5],
                                                 sft_loss_weight=0.1, ref_policy_kl_penalty=0.5))
    algorithm = DPOAlgorithm(settings, pad_id=0)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, vocab_size=V, sliding_window=5, init_method_std=0.1))
    run = ParallelRun(parallel, model, algorithm.head(), max_row_tokens=64)
    run.executor.algorithm = algorithm
    dataset.shared_prompt = shared
    batches = [algorithm.make_batch(dataset, items, packed) for items in _micro_batches(packed)]
    sums = run.executor.forward_backward(batches, len(dataset))
    params = [p for p in model.parameters() if p.grad is not None]
    norm = float(run.finish_grads(params, float("inf")))
    grads = {name: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
             for name, p in model.named_parameters() if p.grad is not None}
    return {"sums": {k: float(v) for k, v in sums.items()}, "grad_norm": norm, "grads": grads}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


def _worker(rank: int, root: str, ports: dict):
    torch.set_num_threads(1)
    out = {}
    for name, layout in LAYOUTS.items():
        os.environ["MASTER_PORT"] = str(ports[name])
        parallel = _parallel(layout, rank)
        for packed in (False, True):
            results = {shared: one_step(parallel, shared, packed) for shared in (False, True)}
            # shared against unshared on this rank: the same shards, so gradients compare element by element
            for param, want in results[False]["grads"].items():
                got = results[True]["grads"][param]
                assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), (name, param)
            out[f"{name}/{'packed' if packed else 'padded'}"] = {
                str(shared): {"sums": r["sums"], "grad_norm": r["grad_norm"]} for shared, r in results.items()}
        dist.destroy_process_group()
        forget_meshes()
    if rank == 0:
        (Path(root) / "distributed.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_prompt_distributed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {packed: one_step(_parallel({}, None), False, packed) for packed in (False, True)}
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(str(root), dict(zip(LAYOUTS, _free_ports(len(LAYOUTS))))), nprocs=2, join=True)
    return single, json.loads((root / "distributed.json").read_text())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shared_prompts_train_like_two_sequences_and_like_one_process(results, layout, packed):
    single, distributed = results
    want = single[packed]
    assert want["sums"]["loss"] > 0 and want["grad_norm"] > 0
    for shared in ("False", "True"):
        got = distributed[f"{layout}/{'packed' if packed else 'padded'}"][shared]
        assert set(got["sums"]) == set(want["sums"])
        for key, value in want["sums"].items():
            assert _close(got["sums"][key], value), (shared, key, got["sums"][key], value)
        assert _close(got["grad_norm"], want["grad_norm"]), (shared, got["grad_norm"], want["grad_norm"])
