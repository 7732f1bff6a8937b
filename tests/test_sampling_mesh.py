"""Slot sampling on a 2x2x2 CPU mesh (issue 30 item 5): the same samples as on one device.

The test runs this file as a script in a subprocess with 8 CPU devices (JAX fixes its device count at
start-up) and reads the JSON report on its last line:

  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8 python tests/test_sampling_mesh.py
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report() -> dict:
    """Samples PEOPLE (tiny llama; per-participant temperature and options) on one device and on the
    2x2x2 mesh; the largest log-prob difference, token equality and where the parameters lie."""
    import jax
    import numpy as np
    from test_sampling import PEOPLE, tiny_model

    from psych201_jax.parallel import sharding
    from psych201_jax.sampling.sampler import SamplingConfig, SlotSampler, sample_participants

    assert jax.device_count() == 8, jax.devices()
    model = tiny_model("llama")
    mesh = sharding.make_mesh(2, 2, 2)
    config = SamplingConfig(samples=3, max_new_tokens=6, temperature=1.0, seed=2, branch_capacity=8)
    kw = dict(row_lengths=(512,), temperature_of={PEOPLE[2].key: 0.0}, options_of={PEOPLE[1].key: (11, 42, 300)})
    one = sample_participants(model, PEOPLE, config, **kw)
    many = sample_participants(model, PEOPLE, config, mesh=mesh, **kw)
    pairs = [(a, b) for key in one for a, b in zip(one[key].samples, many[key].samples)]
    placed = SlotSampler(model, config, mesh=mesh).state
    return {
        "branches": len(pairs),
        "distinct": len({tuple(a.generated) for a, _ in pairs}),
        "tokens_equal": all(np.array_equal(a.generated, b.generated) and a.stop == b.stop for a, b in pairs),
        "max_logprob_diff": max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in pairs),
        "wq": str(placed["layers"]["wq"].sharding.spec),
        "wq_devices": len(placed["layers"]["wq"].sharding.device_set),
    }


def test_mesh_samples_equal_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["branches"] == 18 and r["distinct"] > 10, r
    assert r["tokens_equal"], r
    assert r["max_logprob_diff"] <= 1e-5, r
    assert r["wq"] == "P(None, 'fsdp', 'tensor', None)" and r["wq_devices"] == 8, r


if __name__ == "__main__":
    print(json.dumps(report()))
