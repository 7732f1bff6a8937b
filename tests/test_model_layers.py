"""Model building blocks: norms bit-exact vs HF, spec parsing and errors, scan grouping, axis names."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo3.modeling_olmo3 import Olmo3RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from psych201_jax.model import decoder as model_lib
from psych201_jax.model import spec as modelspec

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.mark.parametrize("hf_cls,weight_fp32", [(LlamaRMSNorm, False), (Qwen3RMSNorm, False), (Olmo3RMSNorm, True)])
def test_rms_norm_bit_exact_in_bfloat16(hf_cls, weight_fp32):
    rng = np.random.default_rng(0)
    x = (3 * rng.normal(size=(2, 50, 96))).astype(np.float32).astype(ml_dtypes.bfloat16)
    w = rng.uniform(0.5, 1.5, size=96).astype(np.float32).astype(ml_dtypes.bfloat16)
    hf = hf_cls(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.tensor(w.astype(np.float32)))
        ref = hf(torch.tensor(x.astype(np.float32)).to(torch.bfloat16)).float().numpy()
    ours = model_lib.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, weight_fp32=weight_fp32)
    other = model_lib.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, weight_fp32=not weight_fp32)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), ref)
    assert not np.array_equal(np.asarray(other, np.float32), ref)  # cast order is observable


def test_full_width_norm_equals_norm_of_flattened_heads():
    """OLMo 3 q/k norm is over num_heads*head_dim; ours runs on [.., H, hd] over both axes."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=(4, 8)), jnp.float32)
    ours = model_lib.rms_norm(x, w, 1e-6, weight_fp32=True, axes=(-2, -1))
    flat = model_lib.rms_norm(x.reshape(2, 5, 32), w.reshape(32), 1e-6, weight_fp32=True)
    np.testing.assert_allclose(np.asarray(ours).reshape(2, 5, 32), np.asarray(flat), rtol=1e-6)


def _config_dir(tmp_path, **raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    d = _config_dir(tmp_path, model_type="gpt2", n_layer=2)
    with pytest.raises(modelspec.UnsupportedModelError) as err:
        modelspec.from_hf_dir(d)
    for name in modelspec.SUPPORTED_MODEL_TYPES:
        assert name in str(err.value)
    assert "gpt2" in str(err.value)


def test_remote_code_configs_are_refused(tmp_path):
    d = _config_dir(tmp_path, model_type="llama", auto_map={"AutoModelForCausalLM": "x.Model"}, **SMALL)
    with pytest.raises(modelspec.UnsupportedModelError, match="auto_map"):
        modelspec.from_hf_dir(d)


def test_unsupported_rope_type_is_refused():
    config = AutoConfig.for_model("llama", **SMALL, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    with pytest.raises(modelspec.UnsupportedModelError, match="dynamic"):
        modelspec.from_hf_config(config)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        (
            "llama",
            dict(
                tie_word_embeddings=True,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                ),
            ),
        ),
        ("qwen2", {}),
        ("qwen3", dict(head_dim=32)),
        (
            "olmo3",
            dict(
                num_hidden_layers=8,
                rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64),
            ),
        ),
    ],
)
def test_spec_json_round_trip_and_family_flags(model_type, extra):
    spec = modelspec.from_hf_config(AutoConfig.for_model(model_type, **{**SMALL, **extra}))
    assert modelspec.ModelSpec.from_json(spec.to_json()) == spec
    hash(spec)  # static NNX attribute: must be hashable
    assert spec.qkv_bias == (model_type == "qwen2")
    assert spec.qk_norm == {"llama": "none", "qwen2": "none", "qwen3": "head", "olmo3": "full"}[model_type]
    assert spec.norm_placement == ("post" if model_type == "olmo3" else "pre")
    if model_type == "qwen3":
        assert spec.head_dim == 32 != spec.hidden_size // spec.num_heads
    if model_type == "olmo3":
        assert spec.layer_types[:4] == ("sliding_attention",) * 3 + ("full_attention",)
        assert spec.window_for("sliding_attention") == 4096 and spec.window_for("full_attention") is None


@pytest.mark.parametrize(
    "layer_types,expected",
    [
        (("f",) * 6, ((0, 6, ("f",)),)),
        (("s", "s", "s", "f") * 3, ((0, 3, ("s", "s", "s", "f")),)),
        (("s", "s", "s", "f") * 2 + ("s", "s"), ((0, 2, ("s", "s", "s", "f")), (8, 1, ("s", "s")))),
        (("f",) * 5 + ("s",) * 3, ((0, 5, ("f",)), (5, 3, ("s",)))),
        (("f",), ((0, 1, ("f",)),)),
    ],
)
def test_layer_groups(layer_types, expected):
    assert model_lib.layer_groups(layer_types) == expected


def _spec(model_type="olmo3", **kw):
    return modelspec.from_hf_config(AutoConfig.for_model(model_type, **{**SMALL, **kw}))


def test_every_parameter_has_logical_axes_matching_its_rank():
    for spec in (_spec("olmo3", num_hidden_layers=4), _spec("qwen2"), _spec("qwen3", tie_word_embeddings=True)):
        model = nnx.eval_shape(
            lambda spec=spec: model_lib.Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        )
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == len(var.shape), (path, axes, var.shape)
            if path[0] == "layers":
                assert axes[0] == model_lib.LAYERS and var.shape[0] == spec.num_layers


def _count_equations(jaxpr) -> int:
    """Number of equations in ``jaxpr``, nested jaxprs (scan/while bodies) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += _count_equations(sub)
    return count


def test_depth_does_not_grow_the_program():
    """Scanned layers: the traced program has the same size for 8 and 32 layers."""

    def program_size(num_layers):
        spec = _spec("olmo3", num_hidden_layers=num_layers, sliding_window=8)
        model = nnx.eval_shape(
            lambda spec=spec: model_lib.Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        )
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((1, 32), jnp.int32)
        fn = lambda state, a, b, c: nnx.merge(graphdef, state)(a, b, c)  # noqa: E731
        return _count_equations(jax.make_jaxpr(fn)(state, ids, ids, ids).jaxpr)

    assert program_size(8) == program_size(32)


def test_constrain_is_a_noop_without_mesh():
    x = jnp.ones((2, 3))
    assert model_lib.constrain(x, (model_lib.ACT_BATCH, model_lib.ACT_EMBED)) is x


def test_logical_to_spec():
    rules = [("activation_batch", "data"), ("mlp", "model"), ("embed", "model"), ("heads", ("data", "model"))]
    assert model_lib.logical_to_spec(("activation_batch", "mlp", "embed"), rules) == jax.P("data", "model", None)
    assert model_lib.logical_to_spec(("heads", "unknown"), rules) == jax.P(("data", "model"), None)
