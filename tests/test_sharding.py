"""The mesh, the logical axis rules and several processes (jaxtricks/lm/sharding.py), and the whole
trainer on fake CPU devices and on 2 processes on 127.0.0.1 compared with one device."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxtricks.lm import config as config_lib
from jaxtricks.lm import sharding
from jaxtricks.lm.config import ConfigError, DistributedConfig
from jaxtricks.lm.model import Transformer
from jaxtricks.lm.training import init

# --------------------------------------------------------------------------- the rules


def test_every_parameter_is_named_and_placed_by_the_rules():
    cfg = config_lib.ModelConfig(vocab_size=257, num_layers=1, d_model=32, num_heads=2, d_ff=64,
                                 max_seq_len=16)
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    with nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        specs = nnx.get_partition_spec(params)
    placed = {jax.tree_util.keystr(path): spec for path, spec in
              jax.tree_util.tree_leaves_with_path(
                  specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    expected = {  # Megatron: q/k/v and up split by output over tensor, proj and down by input
        "['embed']['embedding']": (None, "fsdp"), "['pos_embed']['embedding']": (None, "fsdp"),
        "['blocks'][0]['attn']['qkv']['kernel']": ("fsdp", "tensor"),
        "['blocks'][0]['attn']['qkv']['bias']": ("tensor",),
        "['blocks'][0]['attn']['proj']['kernel']": ("tensor", "fsdp"),
        "['blocks'][0]['mlp']['up']['kernel']": ("fsdp", "tensor"),
        "['blocks'][0]['mlp']['up']['bias']": ("tensor",),
        "['blocks'][0]['mlp']['down']['kernel']": ("tensor", "fsdp"),
    }
    for path, spec in placed.items():
        key = path.removesuffix(".value")
        assert tuple(spec) == expected.get(key, (None,)), key  # the rest: d_model vectors, whole
    assert len(placed) == len(jax.tree.leaves(params)) == 2 + 12 + 2


def _config(*overrides):
    return config_lib.load(None, ["model.num_heads=4", "model.d_ff=512", "model.d_model=128",
                                  "train.batch_size=16", *overrides])


@pytest.mark.parametrize("overrides, devices, processes, expected", [
    ([], 1, 1, ("single", (1, 1, 1), 1)),
    ([], 8, 1, ("mesh", (8, 1, 1), 8)),
    (["mesh.fsdp=2", "mesh.tensor=2"], 4, 1, ("mesh", (1, 2, 2), 4)),
    (["mesh.data=2", "mesh.fsdp=-1"], 8, 2, ("mesh", (2, 4, 1), 8)),
    (["parallelism=pmap"], 8, 1, ("pmap", None, 8)),
    (["parallelism=single"], 8, 1, ("single", (1, 1, 1), 1)),
])
def test_plan_lays_the_mesh_over_the_devices(overrides, devices, processes, expected):
    plan = sharding.plan_for(_config(*overrides), devices, devices // processes, processes)
    assert tuple(plan) == expected


@pytest.mark.parametrize("overrides, devices, processes, message", [
    (["mesh.data=2", "mesh.fsdp=2"], 8, 1,
     "mesh.data=2, mesh.fsdp=2, mesh.tensor=1: their product (4) must equal the devices of this "
     "run (8: 1 process(es) x 8); set one of them to -1"),
    (["mesh.fsdp=3"], 8, 1,
     "mesh.data=-1, mesh.fsdp=3, mesh.tensor=1: the sizes set (3 devices) must divide the 8"),
    (["mesh.fsdp=2"], 1, 1, "the sizes set (2 devices) must divide the 1 devices of this run"),
    (["train.batch_size=12"], 8, 1,
     "train.batch_size=12 must be divisible by mesh.data x mesh.fsdp = 8 x 1 (8); use a "
     "multiple of 8."),
    (["train.batch_size=24", "train.microbatches=2", "mesh.fsdp=2"], 8, 2,
     "train.batch_size=24 must be divisible by mesh.data x mesh.fsdp = 4 x 2 (8) times "
     "train.microbatches=2; use a multiple of 16."),
    (["parallelism=pmap", "train.batch_size=12"], 8, 1,
     "train.batch_size=12 must be divisible by the devices (8)"),
    (["mesh.tensor=8", "train.batch_size=8"], 8, 1,
     "model.num_heads=4 must be a multiple of mesh.tensor=8 (a device holds whole heads)."),
    (["mesh.tensor=2", "model.d_ff=501"], 2, 1,
     "model.d_ff=501 must be a multiple of mesh.tensor=2 (each device holds part of the MLP)."),
    (["mesh.data=1", "mesh.fsdp=-1", "model.d_model=132", "model.num_heads=3"], 8, 1,
     "model.d_model=132 must be a multiple of mesh.fsdp=8 (parameters are split along it)."),
    (["parallelism=single"], 4, 2,
     "parallelism='single' runs within one process, but this run has 2; allowed: auto or mesh."),
])
def test_plan_refuses_what_the_devices_cannot_run(overrides, devices, processes, message):
    with pytest.raises(ConfigError) as refused:
        sharding.plan_for(_config(*overrides), devices, devices // processes, processes)
    assert message in str(refused.value)


def test_state_bytes_rows_and_constraints_on_one_device():
    config = config_lib.load(None, ["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
                                    "model.d_ff=64", "model.max_seq_len=16", "data.seq_len=16"])
    start = init(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shardings = sharding.state_shardings(start.state, start.optimizer, mesh)
    state = jax.device_put(start.state, shardings)
    leaves = jax.tree.leaves(state)
    assert sharding.state_bytes(state) == (sum(x.nbytes for x in leaves),) * 2
    assert sharding.process_rows(sharding.batch_sharding(mesh), 8) == slice(0, 8)
    x = jnp.ones((4, 3, 2))
    assert sharding.constrain(x, "batch", None, None) is x  # no mesh set: untouched


# --------------------------------------------------------------------------- processes


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, cluster", [
    ({}, None), (SLURM, "SLURM"), ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, "Open MPI"),
])
def test_processes_start_only_where_asked_or_a_cluster_is_detected(monkeypatch, env, cluster):
    for name in [*SLURM, "OMPI_MCA_orte_hnp_uri"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    monkeypatch.setattr(sharding, "_already_started", lambda: False)
    assert sharding.detected_cluster() == cluster
    sharding.start_processes(DistributedConfig())
    assert calls == ([] if cluster is None else [()])  # a cluster's own settings
    sharding.start_processes(DistributedConfig("10.0.0.1:1234", 4, 3))
    assert calls[-1] == ("10.0.0.1:1234", 4, 3)


# --------------------------------------------------------------------------- the trainer (slow)

TINY = ["data.tokenizer=byte",  # bytes: smaller and quicker than the default BPE
        "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=256",
        "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "train.steps=12",
        "optimizer.warmup_steps=2", "train.log_every=1", "train.eval_every=6",
        "train.checkpoint_every=6", "train.sample_tokens=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(python, workdir, *overrides, processes=1, devices=1, data_dir):
    """train.py on ``processes`` processes of ``devices`` CPU devices each; their outputs."""
    args = ["train.py", "--workdir", str(workdir), *TINY, f"data.data_dir={data_dir}",
            f"cpu_devices={devices}", *overrides]
    if processes == 1:
        runs = [python.start(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = _free_port()
        runs = [python.start(*args, f"distributed.coordinator=127.0.0.1:{port}",
                             f"distributed.num_processes={processes}",
                             f"distributed.process_id={i}",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(processes)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{err}"
    return [out for out, _ in outputs]


def _losses(workdir) -> dict[int, float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _assert_same_losses(losses, reference, steps):
    assert sorted(losses) == list(steps), sorted(losses)
    for step in steps:
        assert math.isclose(losses[step], reference[step], rel_tol=1e-4), (step, losses, reference)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data_dir):
    """12 steps on one device, checkpoints at 6 and 12: what every layout must reproduce."""
    from tests.conftest import PythonProcesses

    workdir = tmp_path_factory.mktemp("one-device") / "run"
    processes = PythonProcesses()
    try:
        _train(processes, workdir, data_dir=data_dir)
    finally:
        processes.close()
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("layout, processes, devices", [
    (["mesh.fsdp=2", "mesh.tensor=2"], 1, 4),
    (["mesh.data=2", "mesh.fsdp=2"], 2, 2),
    (["mesh.data=8"], 1, 8),
    (["parallelism=pmap"], 1, 8),
])
def test_layouts_follow_one_device(python, tmp_path, data_dir, one_device, layout, processes,
                                   devices):
    workdir = tmp_path / "run"
    outputs = _train(python, workdir, *layout, processes=processes, devices=devices,
                     data_dir=data_dir)
    _assert_same_losses(_losses(workdir), _losses(one_device), range(1, 13))
    run = json.loads((workdir / "run.json").read_text())
    assert (run["process_count"], run["device_count"]) == (processes, processes * devices)
    assert run["state_bytes"] == json.loads((one_device / "run.json").read_text())["state_bytes"]
    if layout == ["mesh.fsdp=2", "mesh.tensor=2"]:
        assert run["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
        assert run["state_bytes_per_device"] <= 0.35 * run["state_bytes"], run
    # Only process 0 prints the run's lines.
    assert "step 12/12" in outputs[0] and all("step 12/12" not in out for out in outputs[1:])


@pytest.mark.slow
def test_checkpoints_resume_on_another_topology(python, tmp_path, data_dir, one_device):
    # Saved at step 6 by 2 processes x 2 devices (fsdp 4), resumed on 1 device ...
    sharded = tmp_path / "sharded"
    _train(python, sharded, "mesh.fsdp=4", processes=2, devices=2, data_dir=data_dir)
    shutil.rmtree(sharded / "checkpoints" / "12")
    _train(python, sharded, data_dir=data_dir)
    _assert_same_losses(_losses(sharded), _losses(one_device), range(1, 13))
    # ... and the reverse: one device's checkpoint of step 6 resumed on 2 x 2 (fsdp 4).
    single = tmp_path / "single"
    shutil.copytree(one_device, single)
    shutil.rmtree(single / "checkpoints" / "12")
    _train(python, single, "mesh.fsdp=4", processes=2, devices=2, data_dir=data_dir)
    _assert_same_losses(_losses(single), _losses(one_device), range(1, 13))


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(python, tmp_path,
                                                                     data_dir):
    workdir, port = tmp_path / "run", _free_port()
    args = ["train.py", "--workdir", str(workdir), *TINY, f"data.data_dir={data_dir}",
            "cpu_devices=2", "train.steps=100000", "train.checkpoint_every=100000",
            f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2"]
    runs = [python.start(*args, f"distributed.process_id={i}", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while len(_losses(workdir) if (workdir / "metrics.jsonl").exists() else {}) < 20:
        assert time.monotonic() < deadline and all(r.poll() is None for r in runs)
        time.sleep(0.5)
    os.kill(runs[1].pid, signal.SIGTERM)  # the other process is not told
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0] >= 20
    assert f"saved a checkpoint at step {saved[0]}" in outputs[0][0]
    assert max(_losses(workdir)) == saved[0]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], "their product (3) must equal the devices of this run (4: 1 process(es)"),
    (["mesh.tensor=4", "model.num_heads=2"],
     "model.num_heads=2 must be a multiple of mesh.tensor=4"),
    (["mesh.fsdp=4", "train.batch_size=6"], "train.batch_size=6 must be divisible by mesh.data"),
])
def test_bad_meshes_stop_train_py_before_anything_is_written(python, tmp_path, data_dir,
                                                             overrides, message):
    workdir = tmp_path / "run"
    result = python.run("train.py", "--workdir", str(workdir), *TINY, f"data.data_dir={data_dir}",
                        "cpu_devices=4", *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not workdir.exists()


@pytest.mark.slow
def test_a_locked_workdir_stops_every_process(python, tmp_path, data_dir):
    from jaxtricks.lm.workdir import RunLock

    workdir, port = tmp_path / "run", _free_port()
    args = ["train.py", "--workdir", str(workdir), *TINY, f"data.data_dir={data_dir}",
            "cpu_devices=2", f"distributed.coordinator=127.0.0.1:{port}",
            "distributed.num_processes=2"]
    with RunLock(workdir):  # a live run (this test) holds it
        runs = [python.start(*args, f"distributed.process_id={i}", stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [2, 2], outputs
    assert "is in use by process" in outputs[0][1]
    assert "process 0 could not take the lock of workdir" in outputs[1][1]
    assert not workdir.exists()  # our lock removed the workdir it made: nothing else was written
