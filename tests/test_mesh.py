"""The parallel layout object (nemo_aligner/parallel/mesh.py): launcher environments, Slurm node
lists, and every start-up check on sizes, tested without launching anything."""

from types import SimpleNamespace

import pytest

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.parallel.mesh import LaunchEnv, ParallelDims, expand_nodelist


def trainer(num_nodes=1, devices=1):
    return SimpleNamespace(num_nodes=num_nodes, devices=devices, accelerator="cpu")


def model(tp=1, pp=1, gbs=16, mbs=2, split=None, schedule="1f1b", sp=False):
    return SimpleNamespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, global_batch_size=gbs,
                           micro_batch_size=mbs, pipeline_layer_split=split, pipeline_schedule=schedule,
                           sequence_parallel=sp)


def dims(world=8, nodes=1, devices=None, **kwargs):
    return ParallelDims.from_config(trainer(nodes, devices or world // nodes), model(**kwargs), world)


# ------------------------------------------------------------------ launchers
def test_no_launcher_variables_means_one_process():
    env = LaunchEnv.from_environ({})
    assert (env.world_size, env.rank, env.launcher, env.distributed) == (1, 0, "none", False)


def test_torchrun_environment():
    env = LaunchEnv.from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                                  "MASTER_PORT": "1234"})
    assert env == LaunchEnv(rank=5, world_size=8, local_rank=1, master_addr="10.0.0.1", master_port=1234,
                            launcher="torchrun")


def test_slurm_environment_rendezvous_is_first_host_and_default_port():
    env = LaunchEnv.from_environ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                  "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert env == LaunchEnv(rank=9, world_size=16, local_rank=1, master_addr="gpu07", master_port=29500,
                            launcher="slurm")
    exported = {}
    env.export(exported)
    assert exported == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                        "MASTER_PORT": "29500"}


def test_slurm_step_task_count_and_master_port_win():
    env = LaunchEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "64", "SLURM_STEP_NUM_TASKS": "8",
                                  "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a1", "MASTER_PORT": "40000"})
    assert (env.world_size, env.master_port) == (8, 40000)


def test_torchrun_inside_sbatch_uses_torchrun_variables():
    env = LaunchEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 1, 2)


def test_bad_environment_values_name_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE='four'"):
        LaunchEnv.from_environ({"RANK": "0", "WORLD_SIZE": "four"})


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("gpu[098-100]", ["gpu098", "gpu099", "gpu100"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node01]", "node[a-b]", "node[5-3]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="Slurm node list"):
        expand_nodelist(bad)


# ------------------------------------------------------------------ sizes
def test_dp_is_what_tp_and_pp_leave():
    d = dims(world=16, nodes=2, tp=2, pp=2)
    assert (d.pp, d.dp, d.tp, d.mesh_shape) == (2, 4, 2, (2, 4, 2))
    assert d.describe() == "world 16 = pp 2 x dp 4 x tp 2"


def test_world_must_equal_nodes_times_devices():
    with pytest.raises(ValueError, match=r"launched 4 process\(es\) but trainer.num_nodes x trainer.devices = "
                                         r"1 x 8 = 8"):
        ParallelDims.from_config(trainer(1, 8), model(), 4)


def test_world_must_be_divisible_by_tp_times_pp():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by model.tensor_model_parallel_size \(2\) "
                                         r"x model.pipeline_model_parallel_size \(4\) = 8"):
        dims(world=6, tp=2, pp=4)


def test_nonpositive_sizes_rejected():
    with pytest.raises(ValueError, match="model.tensor_model_parallel_size=0"):
        dims(world=2, tp=0)


def test_global_batch_must_divide_over_micro_and_dp():
    with pytest.raises(ValueError, match=r"model.global_batch_size=10 is not divisible by model.micro_batch_size "
                                         r"\(2\) x data-parallel size \(4\) = 8"):
        dims(world=4, gbs=10, mbs=2)


def test_1f1b_needs_as_many_micro_batches_as_stages():
    with pytest.raises(ValueError, match=r"= 2 < pipeline_model_parallel_size=4"):
        dims(world=4, pp=4, gbs=4, mbs=2)
    assert dims(world=4, pp=4, gbs=4, mbs=2, schedule="gpipe").pp == 4  # GPipe has no such limit


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError, match="model.pipeline_schedule='zb'"):
        dims(world=2, pp=2, schedule="zb")


def test_sequence_parallel_with_pipeline_rejected():
    with pytest.raises(ValueError, match="model.sequence_parallel=true with"):
        dims(world=4, tp=2, pp=2, sp=True)


# ------------------------------------------------------------------ model constraints
def gpt(**kwargs):
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=2,
                vocab_size=100)
    return GPTConfig(**{**base, **kwargs})


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=6, num_query_groups=2), "model.num_attention_heads=6 is not divisible by "
                                                      "model.tensor_model_parallel_size=4"),
    (dict(num_attention_heads=8, num_query_groups=2), "model.num_query_groups=2 is not divisible by "
                                                      "model.tensor_model_parallel_size=4"),
    (dict(num_attention_heads=8, num_query_groups=4, ffn_hidden_size=102), "model.ffn_hidden_size=102 is not "
                                                                           "divisible by model.tensor_model_parallel_size=4"),
])
def test_heads_groups_and_ffn_must_divide_by_tp(overrides, message):
    with pytest.raises(ValueError, match=message):
        dims(world=4, tp=4).check_model(gpt(**overrides))


def test_fewer_layers_than_stages_rejected():
    with pytest.raises(ValueError, match=r"model.num_layers=2 < model.pipeline_model_parallel_size=4"):
        dims(world=4, pp=4, gbs=16).check_model(gpt(num_layers=2))


def test_even_split_puts_the_remainder_first():
    assert dims(world=2, pp=2).stage_layers(5) == [range(0, 3), range(3, 5)]
    assert dims(world=4, pp=4, gbs=16).stage_layers(4) == [range(i, i + 1) for i in range(4)]


def test_configured_split():
    assert dims(world=2, pp=2, split=[1, 3]).stage_layers(4) == [range(0, 1), range(1, 4)]


@pytest.mark.parametrize("split", [[2, 1], [4, 0], [1, 1, 2]])
def test_bad_split_rejected(split):
    with pytest.raises(ValueError, match=r"model.pipeline_layer_split=.*expected 2 positive counts .* summing to "
                                         r"model.num_layers=4"):
        dims(world=2, pp=2, split=split).check_model(gpt())


def test_tied_embeddings_with_pipeline_rejected_but_fine_with_tp():
    with pytest.raises(ValueError, match="tied input/output embeddings"):
        dims(world=2, pp=2).check_model(gpt(share_embeddings_and_output_weights=True))
    dims(world=2, tp=2).check_model(gpt(share_embeddings_and_output_weights=True))


def test_schema_rejects_unknown_pipeline_schedule():
    from nemo_aligner.config import ConfigError, DPORunConfig, load_config

    with pytest.raises(ConfigError, match="model.pipeline_schedule"):
        load_config({"model": {"pipeline_schedule": "interleaved"}}, DPORunConfig)
