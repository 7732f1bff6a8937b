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

from psych201_jax.model import axes as model_axes
from psych201_jax.model import decoder as model_lib
from psych201_jax.model import hf_config
from psych201_jax.model import spec as modelspec

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
GEMMA_CAP = dict(attn_logit_softcapping=0.5)  # small enough to bite on an N(0, 0.02)-initialised model


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
        hf_config.from_hf_dir(d)
    for name in modelspec.SUPPORTED_MODEL_TYPES:
        assert name in str(err.value)
    assert "gpt2" in str(err.value)


def test_remote_code_configs_are_refused(tmp_path):
    d = _config_dir(tmp_path, model_type="llama", auto_map={"AutoModelForCausalLM": "x.Model"}, **SMALL)
    with pytest.raises(modelspec.UnsupportedModelError, match="auto_map"):
        hf_config.from_hf_dir(d)


def test_unsupported_rope_type_is_refused():
    config = AutoConfig.for_model("llama", **SMALL, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    with pytest.raises(modelspec.UnsupportedModelError, match="dynamic"):
        hf_config.from_hf_config(config)


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
    spec = hf_config.from_hf_config(AutoConfig.for_model(model_type, **{**SMALL, **extra}))
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


@pytest.mark.parametrize(
    "layer_types,expected",
    [
        (("f",) * 6, ((0, 5, ("f",)),)),
        (("s", "s", "s", "f") * 3, ((0, 2, ("s", "s", "s", "f")), (8, 1, ("s", "s", "s")))),
        (("s", "s", "s", "f") * 2 + ("s", "s"), ((0, 2, ("s", "s", "s", "f")), (8, 1, ("s",)))),
        (("f",) * 5 + ("s",) * 3, ((0, 5, ("f",)), (5, 2, ("s",)))),
        (("f",), ()),
    ],
)
def test_trunk_groups_are_every_layer_but_the_last(layer_types, expected):
    groups = model_lib.trunk_groups(layer_types)
    assert groups == expected
    layers = [layer for start, repeats, pattern in groups for layer in range(start, start + repeats * len(pattern))]
    assert layers == list(range(len(layer_types) - 1))


def _spec(model_type="olmo3", **kw):
    return hf_config.from_hf_config(AutoConfig.for_model(model_type, **{**SMALL, **kw}))


def test_every_parameter_has_logical_axes_matching_its_rank():
    gemma = _spec("gemma3_text", head_dim=16, query_pre_attn_scalar=16)  # sandwich norms and QK-norm
    for spec in (_spec("olmo3", num_hidden_layers=4), _spec("qwen2"), _spec("qwen3", tie_word_embeddings=True), gemma):
        model = nnx.eval_shape(
            lambda spec=spec: model_lib.Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        )
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == len(var.shape), (path, axes, var.shape)
            if path[0] == "layers":
                assert axes[0] == model_axes.LAYERS and var.shape[0] == spec.num_layers


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
    """Scanned layers: the traced programs (the full forward and the scoring one) have the same size for 8
    and 32 layers."""

    def program_size(num_layers):
        spec = _spec("olmo3", num_hidden_layers=num_layers, sliding_window=8)
        model = nnx.eval_shape(
            lambda spec=spec: model_lib.Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        )
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((1, 32), jnp.int32)
        plan = jax.ShapeDtypeStruct((1, 8), jnp.int32), jax.ShapeDtypeStruct((1, 8), jnp.bool_)

        def scoring(state, a, b, c, index, valid):  # the scoring forward: trunk, then the last layer at the plan
            m = nnx.merge(graphdef, state)
            return m.last_layer_at(m.trunk(a, b, c), b, c, index, valid)

        full = jax.make_jaxpr(lambda state, a, b, c: nnx.merge(graphdef, state)(a, b, c))(state, ids, ids, ids)
        return _count_equations(full.jaxpr), _count_equations(
            jax.make_jaxpr(scoring)(state, ids, ids, ids, *plan).jaxpr
        )

    assert program_size(8) == program_size(32)


def test_constrain_is_a_noop_without_mesh():
    x = jnp.ones((2, 3))
    assert model_axes.constrain(x, (model_axes.ACT_BATCH, model_axes.ACT_EMBED)) is x


def test_logical_to_spec():
    rules = [("activation_batch", "data"), ("mlp", "model"), ("embed", "model"), ("heads", ("data", "model"))]
    assert model_axes.logical_to_spec(("activation_batch", "mlp", "embed"), rules) == jax.P("data", "model", None)
    assert model_axes.logical_to_spec(("heads", "unknown"), rules) == jax.P(("data", "model"), None)


QWEN3_5_SMALL = dict(
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", dict(num_hidden_layers=2)),
        ("qwen2", dict(num_hidden_layers=1)),  # no trunk: the embeddings go straight to the last layer
        ("qwen3", dict(num_hidden_layers=3, head_dim=32, tie_word_embeddings=True)),
        ("olmo3", dict(num_hidden_layers=4, sliding_window=8)),  # post-norm; the last layer is a full one
        ("olmo3", dict(num_hidden_layers=3, sliding_window=8)),  # the last layer has a sliding window
        ("qwen3_5_text", dict(num_hidden_layers=4, **QWEN3_5_SMALL)),  # gated attention last
        (
            "qwen3_5_text",
            dict(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"], **QWEN3_5_SMALL),
        ),  # Gated DeltaNet last
        # Gemma 2 (sandwich norms, attention soft cap, query scale; a window layer last) and Gemma 3 (a full
        # layer last, after five window layers and one more).
        ("gemma2", dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, **GEMMA_CAP)),
        ("gemma3_text", dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=24, sliding_window=8)),
    ],
)
def test_the_last_layer_at_scored_positions_equals_the_full_forward(model_type, extra):
    """``trunk`` + ``last_layer_at`` (the scoring forward) give ``__call__``'s hidden states at the chosen
    positions of two row groups, on packed rows with several segments and padding."""
    spec = _spec(model_type, **extra)
    model = model_lib.Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    b, t, groups = 4, 48, 2
    rng = np.random.default_rng(0)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row, lengths in enumerate([(20, 28), (48,), (5, 30), (10, 11, 12)]):
        start = 0
        for s, n in enumerate(lengths, start=1):
            seg[row, start : start + n], pos[row, start : start + n] = s, np.arange(n)
            start += n
    tokens = jnp.asarray(rng.integers(0, spec.vocab_size, (b, t)), jnp.int32)
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    full = np.asarray(model(tokens, pos, seg)).reshape(groups, b // groups * t, -1)
    index = np.stack([np.sort(rng.choice(b // groups * t, 40, replace=False)) for _ in range(groups)])
    valid = rng.random(index.shape) < 0.9
    got = np.asarray(
        model.last_layer_at(model.trunk(tokens, pos, seg), pos, seg, jnp.asarray(index), jnp.asarray(valid))
    )
    want = np.take_along_axis(full, index[..., None], axis=1)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.1  # normalised hidden states, not zeros


def test_gemma_norm_and_geglu_bit_exact_in_bfloat16():
    """Gemma's (1 + w) norm (float32, then cast) bit-exact against HF's in bf16, and tanh-GELU (float32, then
    cast) to the last bits."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from psych201_jax.model import layers

    rng = np.random.default_rng(2)
    x = (3 * rng.normal(size=(2, 50, 96))).astype(np.float32).astype(ml_dtypes.bfloat16)
    w = rng.uniform(-0.5, 0.5, size=96).astype(np.float32).astype(ml_dtypes.bfloat16)
    hf = Gemma2RMSNorm(96, eps=1e-6).to(torch.bfloat16)
    xt = torch.tensor(x.astype(np.float32)).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.tensor(w.astype(np.float32)))
        ref = hf(xt).float().numpy()
        gelu = ACT2FN["gelu_pytorch_tanh"](xt).float().numpy()
    ours = layers.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, weight_fp32=False, zero_centred=True)
    np.testing.assert_array_equal(np.asarray(ours, np.float32), ref)
    act = np.asarray(layers.activate(jnp.asarray(x), modelspec.Activation.GELU_TANH), np.float32)
    # GELU: equal except in the far negative tail, where 1 + tanh cancels and XLA's tanh and torch's differ
    # in their last float32 bits (|GELU| < 1e-3 there: a few 1e-6 at most).
    differ = act != gelu
    assert differ.mean() < 0.05 and np.abs(gelu[differ]).max() < 1e-3
    np.testing.assert_allclose(act, gelu, rtol=0, atol=1e-5)


def test_gemma_configs_outside_the_decoder_are_refused():
    base = dict(SMALL, head_dim=16, query_pre_attn_scalar=16)
    encoder = AutoConfig.for_model("gemma3_text", **base, use_bidirectional_attention=True)
    with pytest.raises(modelspec.UnsupportedModelError, match="bidirectional"):
        hf_config.from_hf_config(encoder)
    exact_gelu = AutoConfig.for_model("gemma2", **base, hidden_activation="gelu")
    with pytest.raises(modelspec.UnsupportedModelError, match="gelu_pytorch_tanh"):
        hf_config.from_hf_config(exact_gelu)


def test_specs_saved_before_the_gemma_fields_load_with_todays_behaviour():
    """A spec JSON without the Gemma fields (saved by an earlier release) reads as the behaviour it had."""
    spec = hf_config.from_hf_config(AutoConfig.for_model("llama", **SMALL))
    d = json.loads(spec.to_json())
    for name in ("activation", "embed_scale", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
        del d[name]
    old = modelspec.ModelSpec.from_json(json.dumps(d))
    assert old == spec and old.activation == modelspec.Activation.SILU and old.attention_scale is None
