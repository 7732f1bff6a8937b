"""Converter: CLI, directory layout, provenance, safetensors reader, safety refusals, restore targets."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from transformers import AutoTokenizer

from psych201_jax.model import checkpoint, hf_config
from psych201_jax.model import hf_weights as weights
from psych201_jax.model import spec as modelspec
from psych201_jax.testing.safetensors import write_safetensors
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A sharded float32 Qwen3 checkpoint (index file + several shards)."""
    return make_tiny_hf_checkpoint(
        "qwen3",
        str(tmp_path_factory.mktemp("q3") / "hf"),
        qwen_tokenizer_dir,
        num_hidden_layers=3,
        head_dim=32,
        max_shard_size="400KB",
    )


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """Converted through the command line, to bfloat16."""
    out = str(tmp_path_factory.mktemp("q3_conv") / "out")
    subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.convert", f"--hf={hf_dir}", f"--out={out}", "--dtype=bfloat16"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out


def _hf_state(hf_dir):
    state = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(hf_dir, name)))
    return state


def test_layout_and_provenance(hf_dir, converted):
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert sorted(os.listdir(converted)) == ["model_spec.json", "params", "provenance.json", "tokenizer"]
    assert modelspec.ModelSpec.load(os.path.join(converted, "model_spec.json")) == hf_config.from_hf_dir(hf_dir)
    with open(os.path.join(converted, "provenance.json")) as fh:
        prov = json.load(fh)
    assert prov["source"] == os.path.abspath(hf_dir)
    assert prov["dtype"] == "bfloat16" and prov["converter_version"] == checkpoint.CONVERTER_VERSION
    assert prov["created_utc"]
    source_files = sorted(os.listdir(hf_dir))
    assert sorted(prov["sha256"]) == source_files
    for name in source_files:
        with open(os.path.join(hf_dir, name), "rb") as fh:
            assert prov["sha256"][name] == hashlib.sha256(fh.read()).hexdigest()


def test_tokenizer_files_are_copied_and_load(hf_dir, converted):
    tok_dir = os.path.join(converted, "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert os.path.isfile(os.path.join(tok_dir, name)), name
    text = "You choose between <<A>> and B."
    ours, source = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(hf_dir)
    assert ours(text).input_ids == source(text).input_ids


def test_restored_parameters_equal_hf_tensors(hf_dir, converted):
    model, spec = checkpoint.load_model(converted)
    hf = _hf_state(hf_dir)
    bf16 = lambda t: t.to(torch.bfloat16).float().numpy()  # noqa: E731
    np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), bf16(hf["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(np.asarray(model.lm_head[...], np.float32), bf16(hf["lm_head.weight"]))
    layer = 2
    p = f"model.layers.{layer}."
    wq = bf16(hf[p + "self_attn.q_proj.weight"]).T.reshape(spec.hidden_size, spec.num_heads, spec.head_dim)
    wo = bf16(hf[p + "self_attn.o_proj.weight"]).T.reshape(spec.num_heads, spec.head_dim, spec.hidden_size)
    np.testing.assert_array_equal(np.asarray(model.layers.wq[...][layer], np.float32), wq)
    np.testing.assert_array_equal(np.asarray(model.layers.wo[...][layer], np.float32), wo)
    np.testing.assert_array_equal(
        np.asarray(model.layers.q_norm[...][layer], np.float32), bf16(hf[p + "self_attn.q_norm.weight"])
    )
    np.testing.assert_array_equal(
        np.asarray(model.layers.w_down[...][layer], np.float32), bf16(hf[p + "mlp.down_proj.weight"]).T
    )
    assert model.layers.wq[...].dtype == jnp.bfloat16


def test_restore_casts_and_places_into_target_shardings(converted):
    model, _ = checkpoint.load_model(converted, dtype="float32")
    assert model.layers.w_gate[...].dtype == jnp.float32 and model.dtype == jnp.float32
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rules = [("mlp", "model"), ("vocab", "model"), ("q_heads", "model"), ("kv_heads", "model")]
    model, _ = checkpoint.load_model(converted, mesh=mesh, rules=rules)
    assert model.layers.w_gate[...].sharding == jax.NamedSharding(mesh, jax.P(None, None, "model"))
    assert model.layers.wq[...].sharding == jax.NamedSharding(mesh, jax.P(None, None, "model", None))
    assert model.embed[...].sharding == jax.NamedSharding(mesh, jax.P("model", None))
    assert model.final_norm[...].sharding == jax.NamedSharding(mesh, jax.P(None))


def test_abstract_model_allocates_nothing(converted):
    spec = modelspec.ModelSpec.load(os.path.join(converted, "model_spec.json"))
    _, state = checkpoint.abstract_model(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)


def test_pickle_weights_need_explicit_permission(hf_dir, converted, tmp_path):
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    for name in os.listdir(hf_dir):
        if not name.startswith("model"):
            shutil.copy2(os.path.join(hf_dir, name), pickle_dir)
    torch.save(_hf_state(hf_dir), pickle_dir / "pytorch_model.bin")
    with pytest.raises(weights.WeightsError, match="allow_pickle"):
        checkpoint.convert(str(pickle_dir), str(tmp_path / "refused"), "bfloat16")
    checkpoint.convert(str(pickle_dir), str(tmp_path / "allowed"), "bfloat16", allow_pickle=True)
    a, _ = checkpoint.load_model(str(tmp_path / "allowed"))
    b, _ = checkpoint.load_model(converted)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b)))


def test_config_weight_mismatch_and_extra_tensors_fail(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.WeightsError, match="mlp"):
        checkpoint.convert(str(bad), str(tmp_path / "o1"), "float32")

    extra = tmp_path / "extra"
    shutil.copytree(hf_dir, extra)
    write_safetensors(str(extra / "model-extra.safetensors"), {"model.mystery.weight": np.ones(3, np.float32)})
    os.remove(extra / "model.safetensors.index.json")  # read every shard in the directory
    with pytest.raises(weights.WeightsError, match="mystery"):
        checkpoint.convert(str(extra), str(tmp_path / "o2"), "float32")


def test_existing_output_is_not_overwritten(hf_dir, converted):
    with pytest.raises(checkpoint.ConvertError, match="already holds a converted checkpoint"):
        checkpoint.convert(hf_dir, converted, "bfloat16")


def test_safetensors_reader_round_trip_and_bf16(tmp_path, qwen_tokenizer_dir):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    write_safetensors(str(tmp_path / "x.safetensors"), tensors)
    reader = weights.SafetensorsReader(str(tmp_path))
    for name, x in tensors.items():
        y = reader.read(name)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))
    torch_view = load_file(str(tmp_path / "x.safetensors"))  # the reference library reads our file
    np.testing.assert_array_equal(torch_view["b"].float().numpy(), tensors["b"].astype(np.float32))

    hf16 = make_tiny_hf_checkpoint("llama", str(tmp_path / "hf16"), qwen_tokenizer_dir, dtype="bfloat16")
    reader = weights.SafetensorsReader(hf16)
    ref = _hf_state(hf16)
    assert reader.names() == set(ref)
    for name, t in ref.items():
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(reader.read(name).astype(np.float32), t.float().numpy())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_converted_tokenizer_resolves_to_the_checkpoints_tokenizer_class(family, tmp_path, qwen_tokenizer_dir):
    """transformers 5 chooses the tokenizer class by the config's model_type (qwen2: Qwen2Tokenizer, which
    builds its own pre-tokenizer in code); the converted folder keeps config.json, so it tokenizes exactly as
    AutoTokenizer on the HF folder does (multi-digit numbers split differently otherwise)."""
    hf = make_tiny_hf_checkpoint(family, str(tmp_path / "hf"), qwen_tokenizer_dir)
    checkpoint.convert(hf, str(tmp_path / "out"), "float32")
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "out" / checkpoint.TOKENIZER))
    theirs = AutoTokenizer.from_pretrained(hf)
    assert type(ours).__name__ == type(theirs).__name__
    text = "Round 12: I pick 345 of 6789 points, café. <<42>>\n\n"
    assert ours(text).input_ids == theirs(text).input_ids


@pytest.mark.parametrize("layout", ["saved", "stacked"])
def test_stacked_parameters_written_one_layer_at_a_time_restore_identically(
    layout, tmp_path, qwen_tokenizer_dir, monkeypatch
):
    """Issue 31: stacks above ``stream_bytes`` (here all of them) go to the checkpoint one layer at a time
    (``StreamedStack``); restored, into expert-sharded targets too, they equal the in-memory path bit for bit.
    The installed orbax passes the layer-writer's probe; where an orbax fails it, stacks are written whole,
    with the same result."""
    assert checkpoint.layer_writes_work()
    hf = make_tiny_hf_checkpoint(
        "qwen3_moe",
        str(tmp_path / "hf"),
        qwen_tokenizer_dir,
        layout=layout,
        num_hidden_layers=3,
        max_shard_size="200KB",
    )
    spec = hf_config.from_hf_dir(hf)
    reader = weights.SafetensorsReader(hf)
    streamed = list(weights.converted_params(reader, spec, "bfloat16", stream_bytes=0))
    stacks = {path[-1] for path, x in streamed if isinstance(x, weights.StreamedStack)}
    assert {"e_gate", "e_up", "e_down", "router", "wq"} <= stacks
    plain, layered = str(tmp_path / "plain"), str(tmp_path / "layered")
    checkpoint.save_params(plain, weights.converted_params(reader, spec, "bfloat16", stream_bytes=None))
    checkpoint.save_params(layered, iter(streamed), chunk_bytes=1 << 12)
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rules = [("expert", "model"), ("mlp", "model"), ("vocab", "model")]
    _, state = checkpoint.abstract_model(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, mesh=mesh, rules=rules)
    abstract = nnx.to_pure_dict(state)
    want, got = checkpoint.restore_params(plain, abstract), checkpoint.restore_params(layered, abstract)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, x), y, target in zip(
        jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(abstract), strict=True
    ):
        assert y.sharding == target.sharding and y.dtype == x.dtype, path
        np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(x).view(np.uint16), err_msg=str(path))
    assert got["layers"]["e_gate"].sharding.spec[1] == "model"  # the experts axis
    if layout == "saved":  # an orbax whose layout the layer writer does not know: stacks are written whole
        monkeypatch.setattr(checkpoint, "layer_writes_work", lambda: False)
        whole = str(tmp_path / "whole")
        checkpoint.save_params(whole, weights.converted_params(reader, spec, "bfloat16", stream_bytes=0))
        for x, y in zip(
            jax.tree.leaves(want), jax.tree.leaves(checkpoint.restore_params(whole, abstract)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(x).view(np.uint16))
