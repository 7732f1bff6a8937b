"""The routed MLP against a per-token brute force (dropless: every token's top-k experts, padding routed
nowhere), and the converter's two expert layouts (one tensor per expert, stacked) giving the same parameters."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psych201_jax import defaults
from psych201_jax.model import hf_config, hf_weights, moe
from psych201_jax.model.params import param_layers, param_shapes
from psych201_jax.model.spec import FULL_ATTENTION, LayerKind, ModelSpec, RopeSpec, UnsupportedModelError
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint


def _spec(**moe_fields) -> ModelSpec:
    return ModelSpec(
        model_type="qwen3_moe",
        vocab_size=16,
        hidden_size=24,
        intermediate_size=0,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=12,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm="head",
        norm_placement="pre",
        norm_weight_fp32=False,
        rope_fp32=False,
        layer_types=("full_attention",),
        sliding_window=None,
        rope=(("full_attention", RopeSpec()),),
        max_position_embeddings=64,
        **{"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 8, **moe_fields},
    )


def _params(spec: ModelSpec, seed: int = 0) -> dict[str, jnp.ndarray]:
    keys = jax.random.split(jax.random.key(seed), 4)
    d, e, f = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
    shapes = {"router": (d, e), "e_gate": (e, d, f), "e_up": (e, d, f), "e_down": (e, f, d)}
    return {name: jax.random.normal(k, shape) / np.sqrt(shape[-2]) for k, (name, shape) in zip(keys, shapes.items())}


def _brute_force(p, x, valid, spec) -> np.ndarray:
    """Each valid token through each of its top-k experts (numpy, float64), weighted; padding: zero."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    out = np.zeros(x.shape)
    for n in np.flatnonzero(valid):
        logits = x[n] @ p["router"]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-probs)[: spec.num_experts_per_tok]
        w = probs[top] / (probs[top].sum() if spec.norm_topk_prob else 1.0)
        for e, weight in zip(top, w):
            g, u = x[n] @ p["e_gate"][e], x[n] @ p["e_up"][e]
            out[n] += weight * ((g / (1 + np.exp(-g))) * u) @ p["e_down"][e]
    return out


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_every_token_reaches_its_top_k_experts_and_padding_none(norm_topk_prob):
    """37 tokens, 6 experts, top 3: each valid token's output is the weighted sum over all three of its experts
    (one dropped choice would move it by a whole expert's term); padding tokens, even huge, output exactly 0
    and leave the valid ones unchanged."""
    spec = _spec(norm_topk_prob=norm_topk_prob)
    p = _params(spec)
    x = np.asarray(jax.random.normal(jax.random.key(1), (37, spec.hidden_size)), np.float32)
    valid = np.ones(37, bool)
    valid[[3, 20, 21, 36]] = False
    run = jax.jit(lambda p, x, v: moe.routed_experts(p, x, v, spec=spec))
    out = np.asarray(run(p, jnp.asarray(x), jnp.asarray(valid)))
    expected = _brute_force(p, x.astype(np.float64), valid, spec)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.all(out[~valid] == 0)
    assert np.abs(expected[valid]).min(axis=1).max() > 1e-2  # each valid token's output is not ~0
    loud = np.where(valid[:, None], x, 1e4)
    np.testing.assert_array_equal(np.asarray(run(p, jnp.asarray(loud), jnp.asarray(valid))), out)


def test_cpu_tiles_equal_ragged_dot():
    """The CPU grouped matmul (experts' rows padded to tiles, one expert per tile) equals ``ragged_dot`` on
    groups of every kind: empty, shorter than a tile, several tiles long, and rows past the last group."""
    spec = _spec()
    p = _params(spec)
    sizes = jnp.asarray([0, 3, 300, 0, 129, 1], jnp.int32)  # 433 of 450 rows: the last 17 in no group
    rows = jax.random.normal(jax.random.key(3), (450, spec.hidden_size))
    ragged = np.asarray(moe.ragged_expert_mlp(rows, p, sizes, spec=spec))[:433]
    tiled = np.asarray(jax.jit(lambda r, s: moe.tiled_expert_mlp(r, p, s, spec=spec))(rows, sizes))
    np.testing.assert_allclose(tiled[:433], ragged, rtol=1e-5, atol=1e-5)
    assert np.all(tiled[433:] == 0)


def test_routing_weights_follow_hf():
    """Float32 weights for Mixtral (moe_weights_fp32), the activation dtype otherwise; renormalised only with
    norm_topk_prob; the experts of each token distinct."""
    x = jax.random.normal(jax.random.key(2), (5, 24), jnp.bfloat16)
    router = _params(_spec())["router"]
    for fp32, norm in ((True, True), (False, False)):
        experts, weights = moe.route(x, router, _spec(moe_weights_fp32=fp32, norm_topk_prob=norm))
        assert weights.dtype == (jnp.float32 if fp32 else jnp.bfloat16)
        sums = np.asarray(weights, np.float32).sum(-1)
        assert np.allclose(sums, 1.0, atol=1e-2) if norm else np.all(sums < 0.99), sums
        assert all(len(set(row)) == 3 for row in np.asarray(experts).tolist())


def test_per_expert_and_stacked_layouts_convert_to_the_same_parameters(tmp_path):
    """Mixtral's hub layout (block_sparse_moe.experts.{e}.w1/w3/w2) and transformers 5's stacked one
    (mlp.experts.gate_up_proj / down_proj) of the same weights give identical parameters; a missing expert
    is named."""
    tok = defaults.DEFAULT_TOKENIZER
    params = {}
    for layout in ("saved", "stacked"):
        hf = make_tiny_hf_checkpoint("mixtral", str(tmp_path / layout), tok, layout=layout, num_hidden_layers=1)
        names = hf_weights.open_weights(hf).names()
        assert ("model.layers.0.mlp.experts.gate_up_proj" in names) == (layout == "stacked")
        reader = hf_weights.open_weights(hf)
        spec = hf_config.from_hf_dir(hf)
        params[layout] = {path: np.asarray(x) for path, x in hf_weights.converted_params(reader, spec, "float32")}
    assert params["saved"].keys() == params["stacked"].keys()
    assert ("layers", "e_gate") in params["saved"]
    for path, x in params["saved"].items():
        np.testing.assert_array_equal(x, params["stacked"][path], err_msg=str(path))

    class Without(hf_weights.SafetensorsReader):
        def names(self):
            return super().names() - {"model.layers.0.block_sparse_moe.experts.5.w2.weight"}

    reader = Without(os.path.join(str(tmp_path / "saved")))
    with pytest.raises(hf_weights.WeightsError, match="experts.5.w2.weight"):
        list(hf_weights.converted_params(reader, spec, "float32"))


def test_dense_layers_by_config_are_read_as_hf_builds_them():
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: a layer is routed unless listed in mlp_only_layers or off
    decoder_sparse_step ((i + 1) % step != 0); a dense layer has a plain MLP of width intermediate_size, and
    the routed stacks hold only the routed layers. A config with no routed layer is refused; the spec
    round-trips through JSON."""
    from transformers import AutoConfig

    small = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, vocab_size=32, intermediate_size=40)
    moe_config = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    config = AutoConfig.for_model(
        "qwen3_moe", **small, **moe_config, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]
    )
    spec = hf_config.from_hf_config(config)
    assert spec.dense_mlp_layers == (0, 2, 3, 4) and spec.dense_intermediate_size == 40
    assert spec.intermediate_size == 0  # no shared expert
    kinds = spec.layer_kinds
    assert [k.dense_mlp for k in kinds] == [True, False, True, True, True, False]
    assert kinds[0] == LayerKind(FULL_ATTENTION, True)
    assert param_layers(spec, "e_gate") == param_layers(spec, "router") == (1, 5)
    assert param_layers(spec, "d_up") == (0, 2, 3, 4) and param_layers(spec, "wq") == tuple(range(6))
    shapes = param_shapes(spec)
    assert shapes["e_gate"] == (2, 4, 16, 8) and shapes["d_gate"] == (4, 16, 40) and shapes["d_down"] == (4, 40, 16)
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(UnsupportedModelError, match="without a routed layer"):
        hf_config.from_hf_config(
            AutoConfig.for_model("qwen2_moe", **small, **moe_config, num_hidden_layers=2, mlp_only_layers=[0, 1])
        )
