"""Distributed DPO and SFT on CPU (gloo): every layout trains exactly like one process.

For tp2, pp2, dp2, tp2 x pp2 and dp2 x tp2 the recipe runs under 2 or 4 processes and must give the
single-process run's losses and metrics for the first 3 steps (fp32: within 1e-5, relative for
metrics that are sums of many log-probs), with precomputed and with online reference log-probs;
a run resumed from its step-2 checkpoint must give the same step 3; and the exported Hugging Face
model must equal the single-process export. SFT runs the same layouts (padded, and packed rows under
pipeline parallel) through the same run object. Four worker processes are started once and run every
layout in turn (a fresh process group per layout) to keep process start-up out of the budget.
"""

import dataclasses
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.helpers import DEMO_TRAIN, DEMO_VAL, ROOT, dpo_config, sft_config

# name -> (world size, overrides). Every layout keeps the single-process global batch (8 pairs).
LAYOUTS = {
    "tp2": (2, ["model.tensor_model_parallel_size=2"]),
    "pp2": (2, ["model.pipeline_model_parallel_size=2"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]),
    "dp2_tp2": (4, ["model.tensor_model_parallel_size=2"]),
}
# Variants folded into the online-reference phase: GPipe for pp2 (1F1B elsewhere), sequence parallel for tp2.
EXTRA_ONLINE = {"pp2": ["model.pipeline_schedule=gpipe"], "tp2": ["model.sequence_parallel=true"]}
# Layouts that also train on packed rows (2 pairs per 288-token row; 4 rows per step, 1 per micro-batch),
# where segment ids and restarting position ids must reach every pipeline stage.
PACKED_LAYOUTS = ("pp2", "tp2_pp2")
# Tied input/output embeddings under tensor parallel: one vocab-sharded weight serves both ends.
TIED_LAYOUTS = ("dp2_tp2",)
# Other members of the loss family (a weighted list, two of them reference-free) under tp x pp.
LOSS_LAYOUTS = ("tp2_pp2",)
# SFT: every layout padded; packed rows (several conversations per row, restarting positions) under pp.
SFT_PACKED_LAYOUTS = ("pp2", "tp2_pp2")
STEPS = 3
TIMING_KEYS = ("train/step_time", "train/tokens_per_sec")


def tiny_overrides(data_dir, world: int) -> list[str]:
    return [
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.micro_batch_size=2", "model.global_batch_size=8",
        f"trainer.devices={world}", f"trainer.dpo.max_steps={STEPS}", "model.optim.sched.max_steps=10",
        "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=1.0", "trainer.dpo.save_interval=2",
        "exp_manager.checkpoint_callback_params.save_top_k=-1", "exp_manager.progress_bar=false",
        "exp_manager.create_tensorboard_logger=false",
        f"model.data.data_prefix.train=[{data_dir / 'train.jsonl'}]",
        f"model.data.data_prefix.validation=[{data_dir / 'val.jsonl'}]",
    ]


def sft_overrides(data_dir, world: int, phase: str) -> list[str]:
    out = [
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.micro_batch_size=2", "model.global_batch_size=8",
        f"trainer.devices={world}", f"trainer.sft.max_steps={STEPS}", "model.optim.sched.max_steps=10",
        "trainer.sft.val_check_interval=3", "exp_manager.create_checkpoint_callback=false",
        "exp_manager.progress_bar=false", "exp_manager.create_tensorboard_logger=false",
        f"model.data.data_prefix.train=[{data_dir / 'sft_train.jsonl'}]",
        f"model.data.data_prefix.validation=[{data_dir / 'sft_val.jsonl'}]",
    ]
    if phase == "sft_packed":
        out += ["model.data.packing=true", "model.data.pack_size=192", "model.global_batch_size=4",
                "model.micro_batch_size=1"]
    return out


def run_sft_phase(log_dir, data_dir, world, overrides, phase):
    from nemo_aligner.recipes.sft import run_sft

    return run_sft(sft_config(log_dir, *sft_overrides(data_dir, world, phase), *overrides))


def phase_overrides(phase: str, layout: str | None = None) -> list[str]:
    if phase == "packed":
        return ["model.data.packing=true", "model.data.pack_size=288", "model.global_batch_size=4",
                "model.micro_batch_size=1", "model.dpo.ref_mode=online", "exp_manager.create_checkpoint_callback=false"]
    if phase == "losses":
        return ["model.dpo.preference_loss=[ipo,rpo_bwd_kl,simpo,orpo]", "model.dpo.preference_loss_weights=[0.1,1,1,1]",
                "model.dpo.sft_loss_weight=0.1", "exp_manager.create_checkpoint_callback=false"]
    if phase == "tied":
        return ["model.share_embeddings_and_output_weights=true", "exp_manager.create_checkpoint_callback=false"]
    if phase == "online":
        return ["model.dpo.ref_mode=online", "exp_manager.create_checkpoint_callback=false",
                *EXTRA_ONLINE.get(layout, [])]
    return ["model.dpo.ref_mode=precompute"]


def no_plot():
    """The PNG of the curves takes seconds per run and is not what these tests check."""
    import nemo_aligner.training.logging as logging_module

    logging_module.plot_curves = lambda *args, **kwargs: None


def run(log_dir, data_dir, world, overrides):
    from nemo_aligner.recipes.dpo import run_dpo

    return run_dpo(dpo_config(log_dir, *tiny_overrides(data_dir, world), *overrides))


# ------------------------------------------------------------------ workers
def _worker(rank: int, root: str, ports: dict):
    torch.set_num_threads(1)
    no_plot()
    root = Path(root)
    for name, (world, overrides) in LAYOUTS.items():
        if rank >= world:
            continue
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(ports[name]))
        out = root / name
        # precompute: 3 steps, checkpoints at steps 2 and 3, HF export at the end
        run(out / "precompute", root / "data", world, overrides + phase_overrides("precompute"))
        if rank == 0:  # keep the straight run's outputs, drop its step-3 checkpoint
            shutil.copy(out / "precompute/metrics.jsonl", out / "straight.jsonl")
            shutil.copytree(out / "precompute/hf", out / "hf_straight")
            shutil.rmtree(out / "precompute/checkpoints/step_00000003")
        dist.barrier()
        # resume from the step-2 checkpoint and train step 3 again
        result = run(out / "precompute", root / "data", world, overrides + phase_overrides("precompute"))
        assert result["resumed"], "the second run should have resumed from step 2"
        run(out / "online", root / "data", world, overrides + phase_overrides("online", name))
        if name in PACKED_LAYOUTS:
            run(out / "packed", root / "data", world, overrides + phase_overrides("packed"))
        if name in TIED_LAYOUTS:
            run(out / "tied", root / "data", world, overrides + phase_overrides("tied"))
        if name in LOSS_LAYOUTS:
            run(out / "losses", root / "data", world, overrides + phase_overrides("losses"))
        run_sft_phase(out / "sft", root / "data", world, overrides, "sft")
        if name in SFT_PACKED_LAYOUTS:
            run_sft_phase(out / "sft_packed", root / "data", world, overrides, "sft_packed")
        dist.destroy_process_group()
        forget_meshes()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def forget_meshes():
    """DTensor caches sharding decisions keyed by a mesh's ranks and names, not its process groups, so the
    next layout's equal tp mesh ([0, 1] named "tp") would reuse the destroyed groups for a micro-batch of
    the same shapes ("Could not resolve the process group"). One process per run never re-creates groups."""
    from torch.distributed.tensor import DTensor

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ fast path's copy of it


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:32]))
    # 5 validation pairs: dp ranks get unequal micro-batch counts (2 and 1) and the last micro-batch is partial
    (data / "val.jsonl").write_text("".join(DEMO_VAL.read_text().splitlines(keepends=True)[:5]))
    sft_demo = ROOT / "examples/demo/data"
    (data / "sft_train.jsonl").write_text("".join((sft_demo / "sft_train.jsonl").read_text().splitlines(True)[:32]))
    (data / "sft_val.jsonl").write_text("".join((sft_demo / "sft_val.jsonl").read_text().splitlines(True)[:5]))
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: tiny matmuls only lose from intra-op threads
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
            for phase in ("precompute", "online", "packed", "tied", "losses"):
                run(root / "single" / phase, data, 1, phase_overrides(phase))
            for phase in ("sft", "sft_packed"):
                run_sft_phase(root / "single" / phase, data, 1, [], phase)
    finally:
        torch.set_num_threads(threads)
    t1 = time.perf_counter()
    ports = dict(zip(LAYOUTS, _free_ports(len(LAYOUTS))))
    mp.spawn(_worker, args=(str(root), ports), nprocs=max(w for w, _ in LAYOUTS.values()), join=True)
    print(f"single-process runs {t1 - t0:.1f}s, distributed runs {time.perf_counter() - t1:.1f}s")
    return root


# ------------------------------------------------------------------ comparisons
def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_metrics(got: list[dict], want: list[dict], where: str):
    assert [r["step"] for r in got] == [r["step"] for r in want], where
    for g, w in zip(got, want):
        assert set(g) == set(w), f"{where}: metric names differ: {set(g) ^ set(w)}"
        for key, value in w.items():
            if key in TIMING_KEYS or not isinstance(value, (int, float)):
                continue
            assert math.isclose(g[key], value, rel_tol=1e-5, abs_tol=1e-5), \
                f"{where} step {w['step']} {key}: {g[key]} != {value} (single process)"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_precompute_metrics_equal_single_process(runs, layout):
    want = read(runs / "single/precompute/metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3] and "val/loss" in want[-1]
    assert_same_metrics(read(runs / layout / "straight.jsonl"), want, f"{layout} precompute")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_online_reference_metrics_equal_single_process(runs, layout):
    want = read(runs / "single/online/metrics.jsonl")
    assert_same_metrics(read(runs / layout / "online/metrics.jsonl"), want, f"{layout} online")


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_packed_rows_metrics_equal_single_process(runs, layout):
    want = read(runs / "single/packed/metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3]
    assert_same_metrics(read(runs / layout / "packed/metrics.jsonl"), want, f"{layout} packed")


@pytest.mark.parametrize("layout", LOSS_LAYOUTS)
def test_loss_family_under_tensor_and_pipeline_parallel_equals_single_process(runs, layout):
    want = read(runs / "single/losses/metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3]
    assert_same_metrics(read(runs / layout / "losses/metrics.jsonl"), want, f"{layout} loss family")


@pytest.mark.parametrize("layout", TIED_LAYOUTS)
def test_tied_embeddings_under_tensor_parallel_equal_single_process(runs, layout):
    want = read(runs / "single/tied/metrics.jsonl")
    assert_same_metrics(read(runs / layout / "tied/metrics.jsonl"), want, f"{layout} tied embeddings")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_metrics_equal_single_process(runs, layout):
    want = read(runs / "single/sft/metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3] and "val/loss" in want[-1] and want[0]["train/token_acc"] >= 0
    assert_same_metrics(read(runs / layout / "sft/metrics.jsonl"), want, f"{layout} sft")


@pytest.mark.parametrize("layout", SFT_PACKED_LAYOUTS)
def test_sft_packed_rows_metrics_equal_single_process(runs, layout):
    want = read(runs / "single/sft_packed/metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3] and want[0]["data/examples_per_pack"] > 1
    assert_same_metrics(read(runs / layout / "sft_packed/metrics.jsonl"), want, f"{layout} sft packed")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_from_step_2_gives_the_same_step_3(runs, layout):
    resumed = read(runs / layout / "precompute/metrics.jsonl")
    straight = read(runs / layout / "straight.jsonl")
    assert_same_metrics(resumed, straight, f"{layout} resumed")
    saved = json.loads((runs / layout / "precompute/checkpoints/step_00000002/trainer_state.json").read_text())
    world = LAYOUTS[layout][0]
    assert saved["topology"]["pp"] * saved["topology"]["dp"] * saved["topology"]["tp"] == world


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_export_equals_single_process_export(runs, layout):
    want_dir, got_dir = runs / "single/precompute/hf", runs / layout / "hf_straight"
    assert json.loads((got_dir / "config.json").read_text()) == json.loads((want_dir / "config.json").read_text())
    want, got = load_file(want_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=lambda m: f"{layout} {name}: {m}")
    assert (got_dir / "tokenizer.json").is_file()


def test_resume_with_another_layout_fails_clearly(runs, tmp_path):
    from nemo_aligner.training.checkpoint import Checkpointer

    src = runs / "tp2/precompute/checkpoints"
    checkpointer = Checkpointer(src, topology={"pp": 1, "dp": 1, "tp": 1})
    with pytest.raises(ValueError, match=r"was saved with parallel layout .*'tp': 2.* but this run uses"):
        checkpointer.load(checkpointer.latest(), model=None, optimizer=None)


# ------------------------------------------------------------------ pieces, in one process
def tiny_model(**kwargs):
    from nemo_aligner.models.gpt import GPTConfig, GPTModel

    torch.manual_seed(0)
    config = dict(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=50)
    return GPTModel(GPTConfig(**{**config, **kwargs}))


def tiny_batch():
    from nemo_aligner.data.preference.collate import PreferenceBatch

    torch.manual_seed(1)
    input_ids = torch.randint(50, (4, 9))
    labels = torch.full((4, 9), -100)
    labels[:, 3:8] = input_ids[:, 4:9]
    seq_index = torch.where(labels != -100, torch.arange(4)[:, None].expand(4, 9), torch.full((4, 9), -1))
    return PreferenceBatch(input_ids=input_ids, labels=labels, seq_index=seq_index, segment_ids=None,
                           chosen_rewards=torch.ones(2), rejected_rewards=torch.zeros(2),
                           example_indices=torch.arange(2), num_real_tokens=36)


def policy(model, chunk_size=1024):
    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.models.heads import ModelWithHead

    return ModelWithHead(model, LogProbHead(chunk_size))


def test_model_with_log_prob_head_gives_each_sequences_log_prob():
    from nemo_aligner.algorithms.dpo import pair_sums

    model, batch = tiny_model(), tiny_batch()
    token_logps = policy(model, chunk_size=7)(batch.input_ids, labels=batch.labels)
    chosen, rejected, len_c, len_r = pair_sums(batch, token_logps)
    with torch.no_grad():  # independent reference: full logits, log-softmax, gather
        logps = torch.log_softmax(model.logits(batch.input_ids).double(), -1)
        per_row = [logps[r, 3:8].gather(-1, batch.input_ids[r, 4:9, None]).sum() for r in range(4)]
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).double(), torch.tensor(per_row).view(2, 2),
                               rtol=0, atol=1e-5)
    assert len_c.tolist() == len_r.tolist() == [5.0, 5.0]


def test_pipeline_stages_chained_equal_the_whole_model():
    import copy

    from nemo_aligner.losses.logprobs import LogProbHead
    from nemo_aligner.models.heads import ModelWithHead
    from nemo_aligner.parallel.mesh import ParallelDims
    from nemo_aligner.parallel.pipeline import prune_to_stage

    model, batch = tiny_model(), tiny_batch()
    want = policy(model)(batch.input_ids, labels=batch.labels)
    splits = ParallelDims(world_size=2, pp=2, layer_split=(1, 2)).stage_layers(3)
    first = ModelWithHead(prune_to_stage(copy.deepcopy(model), splits[0], True, False), None)
    last = ModelWithHead(prune_to_stage(copy.deepcopy(model), splits[1], False, True), LogProbHead())
    assert list(first.model.layers) == ["0"] and list(last.model.layers) == ["1", "2"]
    assert last.model.embedding is None and first.model.output_layer is None and first.model.final_norm is None
    positions = torch.arange(9).expand(4, 9)
    hidden = first(batch.input_ids, labels=batch.labels, position_ids=positions)
    assert hidden.shape == (4, 9, 32) and first.output_trailing_shape() == (32,)
    torch.testing.assert_close(last(hidden, labels=batch.labels, position_ids=positions), want)


def test_padding_a_batch_changes_no_real_log_prob():
    from nemo_aligner.algorithms.dpo import pair_sums

    module, batch = policy(tiny_model()), tiny_batch()
    padded = batch.padded(6, 16)
    assert padded.input_ids.shape == (6, 16) and int((padded.labels != -100).sum()) == 20
    assert (padded.seq_index[4:] == -1).all() and padded.num_pairs == 2
    run = lambda b: pair_sums(b, module(b.input_ids, labels=b.labels, segment_ids=b.segment_ids))  # noqa: E731
    for g, w in zip(run(padded), run(batch)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-5)
    packed = dataclasses.replace(batch, segment_ids=torch.zeros(4, 9, dtype=torch.long))
    from nemo_aligner.models.gpt import positions_from_segments

    segs = packed.padded(4, 12).segment_ids
    pad = segs[:, 9:]  # every padding token is a segment of its own, so its position is 0
    assert (pad >= 1).all() and pad.unique().numel() == pad.numel()
    assert (positions_from_segments(segs)[:, 9:] == 0).all()


def test_clip_grad_norm_matches_torch_for_plain_tensors():
    from nemo_aligner.parallel.fsdp import clip_grad_norm_

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    from nemo_aligner.parallel.fsdp import _sum_of_squares

    squares = float(_sum_of_squares([p.grad for p in params]))  # the arithmetic of the sharded path
    want = float(torch.nn.utils.clip_grad_norm_(twins, 0.5))
    assert math.sqrt(squares) == pytest.approx(want, rel=1e-6)
    assert clip_grad_norm_(params, 0.5) == pytest.approx(want, rel=1e-6)
    for t, p in zip(twins, params):
        torch.testing.assert_close(p.grad, t.grad)


def test_streaming_writer_shards_like_save_pretrained(tmp_path):
    from nemo_aligner.models.hf.common import write_safetensors
    from nemo_aligner.parallel.export import ShardedSafetensorsWriter

    tensors = {f"w{i}": torch.full((10, 10), float(i)) for i in range(5)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_safetensors(tensors, tmp_path / "a", max_shard_bytes=900)
    writer = ShardedSafetensorsWriter(tmp_path / "b", max_shard_bytes=900)
    for name, tensor in tensors.items():
        writer.add({name: tensor})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    index_a = json.loads((tmp_path / "a/model.safetensors.index.json").read_text())
    assert index_a == json.loads((tmp_path / "b/model.safetensors.index.json").read_text())


def test_pipeline_stage_reads_only_its_own_checkpoint_tensors(tmp_path, monkeypatch):
    import nemo_aligner.models.hf as hf
    from nemo_aligner.parallel.pipeline import prune_to_stage

    model = tiny_model()
    hf.save_pretrained(model, tmp_path / "hf")
    read = []
    real_read = hf.read_tensors
    monkeypatch.setattr(hf, "read_tensors", lambda files, names, dtype: read.extend(names) or real_read(files, names,
                                                                                                       dtype))
    stage = hf.load_pretrained(tmp_path / "hf", prune=lambda m: prune_to_stage(m, range(2, 3), False, True))
    assert sorted(read) == ["lm_head.weight", "model.layers.2.input_layernorm.weight",
                            "model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight",
                            "model.layers.2.mlp.up_proj.weight", "model.layers.2.post_attention_layernorm.weight",
                            "model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.o_proj.weight",
                            "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight",
                            "model.norm.weight"]
    want = {k: v for k, v in model.state_dict().items() if k.startswith(("layers.2.", "final_norm", "output_layer"))}
    got = stage.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
