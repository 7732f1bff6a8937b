"""Meshes, rules and SPMD steps: 8 fake CPU devices (subprocess) give the single-device NLLs; 70B layout."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from psych201_jax.conditions import DEFAULT_TEMPERATURES
from psych201_jax.model.axes import logical_to_spec
from psych201_jax.parallel import distributed, sharding
from psych201_jax.scoring import stream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import mp_driver  # noqa: E402


def _abstract_mesh(data, fsdp, tensor):
    return jax.sharding.AbstractMesh((data, fsdp, tensor), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "mp_driver.py"), "meshes"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["8x1x1", "2x2x2", "1x2x4"])
def test_meshes_give_single_device_nlls(report, mesh):
    r = report["meshes"][mesh]
    assert r["max_per_token"] <= 1e-5 and r["max_rel"] <= 1e-5, r
    assert r["max_abs"] <= 5e-5, r  # response sums of up to ~60 nats: float32 rounding of the sum
    assert r["argmax_equal"], r
    assert r["compilations"]["forward"] <= 2  # one forward per sub-batch shape, as on one device
    # The temperature grid and the entropy: vocabulary split over tensor (1x2x4) or not, as on one device.
    # NLL_T moves by a logit's rounding over T, so at the grid's T = 0.25 four times the NLL's 1e-5.
    assert set(r["calibration_max_rel"]) == {"nll_t", "entropy"}, r
    assert r["calibration_max_rel"]["entropy"] <= 1e-5, r
    assert r["calibration_max_rel"]["nll_t"] <= 1e-5 / min(DEFAULT_TEMPERATURES), r


@pytest.mark.slow
def test_default_scorer_is_the_explicit_one_device_mesh(report):
    """Scorer(model) runs on the 1x1x1 mesh of the first device: the same numbers as that mesh given."""
    r = report["meshes"]["1x1x1"]
    assert r["max_abs"] == 0.0 and r["argmax_equal"]


@pytest.mark.slow
def test_indivisible_kv_heads_are_replicated(report):
    """Bundled model: 4 query heads, 2 key/value heads; tensor=4 shards the first, replicates the second."""
    r = report["meshes"]["1x2x4"]
    assert ["kv_heads", "tensor"] not in r["rules"] and ["q_heads", "tensor"] in r["rules"]
    assert r["shardings"]["wq"] == "P(None, 'fsdp', 'tensor', None)"
    assert r["shardings"]["wk"] == "P(None, 'fsdp', None, None)"


@pytest.mark.slow
def test_llama70b_sharded_abstract_state(report):
    r = report["llama70b"]
    assert r["live_arrays_added"] == 0  # nothing allocated
    assert 70.5e9 < r["params"] < 70.6e9
    for mesh in ("1x8x1", "1x2x4", "1x4x2", "1x1x8"):
        assert r[mesh]["devices"] == 8 and r[mesh]["ratio_to_total_over_8"] <= 1.05, (mesh, r[mesh])
    assert 1.95 < r["2x4x1"]["ratio_to_total_over_8"] < 2.05  # data replicas hold a full copy each


def test_rules_keep_only_dividing_axes():
    spec = mp_driver.LLAMA31_70B
    rules = dict(sharding.rules_for(spec, _abstract_mesh(1, 2, 16)))
    assert rules["q_heads"] == "tensor" and "kv_heads" not in rules  # 64 % 16 == 0, 8 % 16 != 0
    assert rules["vocab"] == "tensor" and rules["embed"] == "fsdp"
    assert rules["activation_batch"] == ("data", "fsdp")  # rows are made a multiple by the scorer
    # Longest dividing prefix: embed 8192 % 3 != 0 drops the rule; mlp keeps tensor (size 1), not fsdp=3.
    table = sharding.rules_for(
        spec, _abstract_mesh(1, 3, 1), (("embed", ("fsdp", "tensor")), ("mlp", ("tensor", "fsdp")), ("layers", None))
    )
    assert table == (("mlp", "tensor"), ("layers", None))


def test_mesh_shape():
    assert sharding.mesh_shape(-1, 2, 2, n_devices=16) == (4, 2, 2)
    assert sharding.mesh_shape(2, -1, 1, n_devices=8) == (2, 4, 1)
    for bad in ((-1, -1, 1), (3, -1, 1), (2, 2, 1), (0, 1, 1)):
        with pytest.raises(ValueError):
            sharding.mesh_shape(*bad, n_devices=8)


def test_plan_steps_agree_on_shapes_and_pad_with_empty_sub_batches():
    # Two shares of one process each, 2 slots per step. Share 0: three (2, 4096) batches, one (4, 2048);
    # share 1: one (2, 4096) batch and two (8, 1024).
    tables = [
        np.array([[2, 4096, 256], [2, 4096, 512], [4, 2048, 256], [2, 4096, 1024]]),
        np.array([[8, 1024, 256], [2, 4096, 2048], [8, 1024, 512]]),
    ]
    steps = [stream.plan_steps(tables, (0, 1), share, 2) for share in (0, 1)]
    assert [(s.rows, s.length, s.capacity) for s in steps[0]] == [(s.rows, s.length, s.capacity) for s in steps[1]]
    assert [(s.rows, s.length, s.capacity) for s in steps[0]] == [
        (2, 4096, 2048),
        (2, 4096, 256),
        (4, 2048, 256),
        (8, 1024, 512),
    ]
    assert [s.slots for s in steps[0]] == [(3, 1), (0, None), (2, None), (None, None)]
    assert [s.slots for s in steps[1]] == [(1, None), (None, None), (None, None), (2, 0)]
    # Every local batch is scheduled exactly once.
    for share, table in enumerate(tables):
        placed = sorted(i for s in steps[share] for i in s.slots if i is not None)
        assert placed == list(range(len(table)))


def test_plan_steps_replicas_follow_their_share():
    table = np.array([[2, 4096, 256]])
    steps = stream.plan_steps([table, table, np.zeros((0, 3))], (0, 0, 1), 0, 1)
    assert [(s.rows, s.capacity, s.slots) for s in steps] == [(2, 256, (0,))]
    assert stream.plan_steps([table, table, np.zeros((0, 3))], (0, 0, 1), 1, 1)[0].slots == (None,)


def test_take_share_is_a_partition():
    shares = [list(distributed.take_share(range(11), i, 3)) for i in range(3)]
    assert sorted(x for s in shares for x in s) == list(range(11))
    assert shares[1] == [1, 4, 7, 10]


def test_row_layout_on_one_device():
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = sharding.RowLayout.create(mesh, sharding.ROW_AXES)
    assert (layout.shards, layout.local_shards, layout.share_index, layout.share_count, layout.writer) == (
        1,
        (0,),
        0,
        1,
        True,
    )
    assert logical_to_spec(("activation_batch", "activation_length"), sharding.RULES) == jax.P(("data", "fsdp"), None)
