"""launch/device_check.sh --dry_run: the accelerator check's code paths on CPU, so the script never rots (the
slot-sampling comparison of benchmarks/sampling.py included: its ``simulate`` stage)."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KEYS = {
    "family",
    "layers",
    "full_depth_layers",
    "participants",
    "tokens",
    "ours_tokens_per_s",
    "first_pass_s",
    "batch_shapes",
    "mfu",
    "mfu_executed",
    "peak_memory_bytes",
    "hf_reference_tokens_per_s",
    "hf_reference_device",
    "speedup_vs_hf_batch1",
    "max_rel_delta_nll_vs_hf_bf16",
    "mesh_on_tokens_per_s",
    "mesh_off_tokens_per_s",
    "mesh_on_equals_off",
}

SIMULATE_KEYS = {
    "model",
    "family",
    "layers",
    "full_depth_layers",
    "slots",
    "participants",
    "samples",
    "max_new_tokens",
    "prefix_tokens_mean",
    "prefix_tokens_max",
    "packed_batches",
    "counted",
    "ours_s",
    "ours_first_pass_s",
    "ours_tokens",
    "ours_tokens_per_s",
    "ours_slots_per_s",
    "ours_peak_memory_bytes",
    "hf_s",
    "hf_batch",
    "hf_tokens",
    "hf_tokens_per_s",
    "hf_slots_per_s",
    "hf_peak_memory_bytes",
    "hf_device",
    "speedup_slots_per_s",
    "speedup_tokens_per_s",
    "max_abs_delta_logprob_vs_hf",
}


def test_dry_run_writes_every_key(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "launch/device_check.sh", "--dry_run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = json.loads((tmp_path / "device_check.json").read_text())
    assert out["dry_run"] is True and out["ok"] is True and out["complete"] is True
    assert {"dense", "xla"} <= set(out["backends"])
    for name, entry in out["backends"].items():
        assert entry["leak_max_abs"] == 0.0, name
    assert "max_abs_vs_xla_softcap" in out["backends"]["dense"]
    assert out["peak_matmul_tflops"] > 0
    assert set(out["models"]) == {
        "qwen3_0.6b",
        "llama3.1_8b",
        "olmo2_7b",
        "mistral_7b",
        "gemma2_9b",
        "gemma3_4b",
        "qwen3_30b_a3b",
        "qwen3_5_35b_a3b",
    }
    for name, entry in out["models"].items():
        assert set(entry) == MODEL_KEYS, name
        assert entry["mesh_on_equals_off"] is True
        assert all(
            math.isfinite(entry[k]) and entry[k] > 0
            for k in ("ours_tokens_per_s", "mfu", "mfu_executed", "speedup_vs_hf_batch1")
        )
        assert entry["max_rel_delta_nll_vs_hf_bf16"] < 0.05, entry  # bf16 vs bf16 on the same weights
    simulate = out["simulate"]  # slot sampling against HF generate on the qwen3_0.6b shape (tiny here)
    assert set(simulate) == SIMULATE_KEYS, simulate
    assert simulate["model"] == "qwen3_0.6b" and simulate["slots"] == 4 and simulate["hf_device"] == "cpu"
    assert all(
        math.isfinite(simulate[k]) and simulate[k] > 0
        for k in ("ours_tokens_per_s", "ours_slots_per_s", "hf_tokens_per_s", "hf_slots_per_s", "speedup_slots_per_s")
    )
    assert simulate["max_abs_delta_logprob_vs_hf"] < 0.5, simulate  # bf16 log-probs of the same weights
    assert (tmp_path / "device_check.log").read_text().strip()


def test_mfu_counts_a_mixture_of_experts_active_parameters():
    """Qwen3-30B-A3B: the forward FLOPs per token (attention scores aside) are 2 x its active non-embedding
    parameters (HF's meta-device count: 3,353,032,704 active, embeddings and head included; norms aside)."""
    from transformers import AutoConfig

    from benchmarks import measure
    from psych201_jax.model.hf_config import from_hf_config

    with open(os.path.join(REPO, "tests", "data", "hub_configs", "Qwen3-30B-A3B.json")) as fh:
        hf = json.load(fh)
    spec = from_hf_config(AutoConfig.for_model(hf.pop("model_type"), **hf))

    class One:
        token_ids, response_index = [0], [0]

    flops = measure.model_flops(spec, [One()]) - measure.attention_flops(spec, [One()])
    active = 3_353_032_704 - 2 * spec.vocab_size * spec.hidden_size  # untied embedding and head
    assert abs(flops / 2 / active - 1) < 1e-3
