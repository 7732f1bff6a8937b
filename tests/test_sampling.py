"""Slot sampling (psych201_jax/sampling): branches decoded on a shared prefill against the plain forward,
packing invariance, no leakage across participants, stopping, and the sampling options.

Tiny random models are built in JAX from the tiny families' HF configs (``tiny_models``) and rescaled as
the parity checkpoints are (unit-gain projections, peaked outputs), so a wrong key or a missing mask shows
in the log-probs. Participants are synthetic token sequences with response runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoConfig

from psych201_jax.model import spec as modelspec
from psych201_jax.model.decoder import BIASES, Decoder
from psych201_jax.model.layers import soft_cap
from psych201_jax.sampling import sampler as sampler_lib
from psych201_jax.sampling import slots as slots_lib
from psych201_jax.sampling.sampler import SamplingConfig, sample_participants
from psych201_jax.testing import tiny_models

VOCAB = 512
REF_LENGTH = 256  # the plain forward's row length (one compilation for every branch)
FAN_IN = {"wq": 1, "wk": 1, "wv": 1, "w_gate": 1, "w_up": 1, "w_down": 1, "wo": 2}  # axes 1..n: the fan-in


@dataclasses.dataclass(frozen=True)
class Participant:
    key: tuple
    token_ids: np.ndarray
    response_index: np.ndarray
    n_responses: int


def tiny_spec(family: str) -> modelspec.ModelSpec:
    """The spec of ``family``'s tiny config (``tiny_models``) with a 512-token vocabulary."""
    kwargs = {**tiny_models._COMMON, "vocab_size": VOCAB, **tiny_models._FAMILY_DEFAULTS[family]}
    return modelspec.from_hf_config(AutoConfig.for_model(family, **kwargs))


def tiny_model(family: str, seed: int = 0) -> Decoder:
    """A float32 Decoder of ``family``'s tiny config (vocabulary 512), weights drawn as the parity checkpoints'."""
    spec = tiny_spec(family)
    model = Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)

    def draw(name, x):
        shape = x.shape
        if name.endswith("norm"):
            return rng.uniform(-0.5, 0.5, shape) if spec.norm_zero_centred else rng.uniform(0.5, 1.5, shape)
        if name in BIASES:
            return rng.normal(0, 0.5, shape)
        if name == "lm_head" or (name == "embed" and spec.tie_word_embeddings):
            return rng.normal(0, 3.0 / np.sqrt(spec.hidden_size), shape)
        if name == "embed":
            return rng.normal(0, 1.0, shape)
        return rng.normal(0, 1 / np.sqrt(np.prod(shape[1 : FAN_IN[name] + 1])), shape)

    def walk(tree):
        return {k: walk(v) if isinstance(v, dict) else jnp.asarray(draw(k, v), jnp.float32) for k, v in tree.items()}

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, walk(nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def participant(name: str, length: int, starts, seed: int, width: int = 3) -> Participant:
    """Random tokens (ids 5..499) with a response of ``width`` tokens at each of ``starts``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 500, length).astype(np.int32)
    index = np.full(length, -1, np.int32)
    for r, s in enumerate(starts):
        index[s : s + width] = r
    return Participant(("study", "exp", name), tokens, index, len(starts))


PEOPLE = (
    participant("a", 150, [10, 70, 130], seed=1),  # slots past the 64-token window of mistral / gemma
    participant("b", 90, [5, 60], seed=2),
    participant("c", 40, [20], seed=3),
)


@pytest.fixture(scope="module")
def models():
    return {}


def model_of(models, family):
    if family not in models:
        models[family] = tiny_model(family)
    return models[family]


@nnx.jit
def _plain_log_probs(model, tokens):
    """The ordinary full forward's next-token log-probs [T, V] of one sequence padded to REF_LENGTH."""
    n = jnp.sum(tokens >= 0)
    t = jnp.arange(tokens.shape[0])
    segment = (t < n).astype(jnp.int32)
    hidden = model(jnp.maximum(tokens, 0)[None], jnp.where(t < n, t, 0)[None], segment[None])[0]
    w = model.unembedding().astype(hidden.dtype)
    logits = soft_cap(
        jnp.einsum("td,vd->tv", hidden, w, preferred_element_type=jnp.float32), model.spec.final_logit_softcap
    )
    return jax.nn.log_softmax(logits, axis=-1)


def plain_log_probs(model, tokens: np.ndarray) -> np.ndarray:
    padded = np.full(REF_LENGTH, -1, np.int32)
    padded[: len(tokens)] = tokens
    return np.asarray(_plain_log_probs(model, jnp.asarray(padded)))


def slot_of(key, response):
    person = next(p for p in PEOPLE if p.key == key)
    slot = next(
        s for s in slots_lib.participant_slots(key, person.token_ids, person.response_index) if s.response == response
    )
    return person, slot


def run(model, people=PEOPLE, row_lengths=(512,), **config):
    return sample_participants(model, people, SamplingConfig(**config), row_lengths=row_lengths)


# --- 1 and 5: the shared-prefill decode equals the plain forward --------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2"])
def test_each_step_log_prob_equals_the_plain_forward(models, family):
    """Every branch's per-step log-probs equal the full forward's on (prefix up to p + the sampled tokens);
    mistral (a 64-token window everywhere) and gemma2 (windows, attention and final soft caps, query
    scale) have slots beyond the window, and mistral's branches run past it, so a window off by a step, on
    the prefix or on the generated tokens, or a missing cap shows."""
    model = model_of(models, family)
    n_new = 72 if family == "mistral" else 8  # past the window: its own oldest tokens drop out of it too
    out = run(model, samples=2, max_new_tokens=n_new, temperature=1.0, seed=3, branch_capacity=8)
    assert len(out) == 6
    worst = 0.0
    for (key, response), got in out.items():
        person, slot = slot_of(key, response)
        np.testing.assert_array_equal(got.human, person.token_ids[person.response_index == response])
        for sample in got.samples:
            assert sample.stop == sampler_lib.STOP_LENGTH and len(sample.generated) == n_new
            sequence = np.concatenate([person.token_ids[: slot.prefix_end + 1], sample.generated])
            lp = plain_log_probs(model, sequence)
            steps = slot.prefix_end + np.arange(len(sample.generated))
            worst = max(worst, float(np.abs(lp[steps, sample.generated] - sample.logprobs).max()))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_equals_a_plain_greedy_loop(models, family):
    model = model_of(models, family)
    out = run(model, people=PEOPLE[:2], samples=1, max_new_tokens=6, temperature=0.0)
    for (key, response), got in out.items():
        person, slot = slot_of(key, response)
        sequence = person.token_ids[: slot.prefix_end + 1]
        for _ in range(6):
            sequence = np.append(sequence, np.argmax(plain_log_probs(model, sequence)[len(sequence) - 1]))
        np.testing.assert_array_equal(got.samples[0].generated, sequence[slot.prefix_end + 1 :])


# --- 2 and 3: packing invariance, no leakage --------------------------------------------------------------


def test_samples_do_not_depend_on_packing(models):
    """Alone, packed with others in a longer or shorter row, or in several decode passes: the same samples."""
    model = model_of(models, "mistral")
    config = dict(samples=3, max_new_tokens=5, temperature=1.0, seed=7)
    alone = run(model, people=PEOPLE[:1], row_lengths=(160,), branch_capacity=16, **config)
    packed = run(model, people=PEOPLE, row_lengths=(512,), branch_capacity=16, **config)
    passes = run(model, people=PEOPLE, row_lengths=(300,), branch_capacity=2, **config)
    for other in (packed, passes):
        for slot_key, got in alone.items():
            for a, b in zip(got.samples, other[slot_key].samples):
                np.testing.assert_array_equal(a.generated, b.generated)
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    distinct = {tuple(s.generated) for got in packed.values() for s in got.samples}
    assert len(distinct) == 3 * 6, "samples of different slots or draws repeat: their seeds do not differ"


def test_another_participants_tokens_change_nothing(models):
    """b (packed before c in the row: it is longer) is redrawn; c's samples keep every bit."""
    model = model_of(models, "llama")
    b, c = PEOPLE[1], PEOPLE[2]
    changed = dataclasses.replace(
        b, token_ids=np.random.default_rng(9).integers(5, 500, len(b.token_ids)).astype(np.int32)
    )
    config = dict(samples=2, max_new_tokens=5, temperature=1.0, row_lengths=(160,), branch_capacity=8)
    before, after = run(model, people=(b, c), **config), run(model, people=(changed, c), **config)
    for response in range(c.n_responses):
        for x, y in zip(before[(c.key, response)].samples, after[(c.key, response)].samples):
            np.testing.assert_array_equal(x.generated, y.generated)
            np.testing.assert_array_equal(x.logprobs, y.logprobs)
    assert any(
        not np.array_equal(x.generated, y.generated)
        for response in range(b.n_responses)
        for x, y in zip(before[(b.key, response)].samples, after[(changed.key, response)].samples)
    ), "changing b changed none of its own samples: the test could not fail"


# --- 4: stopping -----------------------------------------------------------------------------------------


def test_stops_at_the_closing_marker_a_stop_token_or_the_length(models):
    """Greedy continuations are known in advance: a closing marker made of two of their tokens ends each
    branch there (marker excluded from the response), one token as EOS ends it before that token, and
    without either it runs to max_new_tokens."""
    model = model_of(models, "llama")
    person = PEOPLE[2]
    free = run(model, people=(person,), samples=1, max_new_tokens=8, temperature=0.0)[(person.key, 0)].samples[0]
    assert free.stop == sampler_lib.STOP_LENGTH and len(free.tokens) == 8 and not free.stopped
    g = free.generated.tolist()
    at = next(i for i in range(1, 7) if all(g[j : j + 2] != g[i : i + 2] for j in range(i)))
    marker = run(model, people=(person,), samples=1, max_new_tokens=8, temperature=0.0, close_ids=tuple(g[at : at + 2]))
    got = marker[(person.key, 0)].samples[0]
    assert got.stop == sampler_lib.STOP_MARKER and got.stopped
    assert got.tokens.tolist() == g[:at] and got.generated.tolist() == g[: at + 2]
    eos = next(i for i in range(1, 8) if g[i] not in g[:i])
    stopped = run(model, people=(person,), samples=1, max_new_tokens=8, temperature=0.0, stop_ids=(g[eos],))
    got = stopped[(person.key, 0)].samples[0]
    assert got.stop == sampler_lib.STOP_TOKEN and got.tokens.tolist() == g[:eos]
    assert np.isclose(got.logprob, free.logprobs[: eos + 1].sum(), atol=1e-5)


# --- 6: sampling options --------------------------------------------------------------------------------


def test_options_top_k_and_top_p(models):
    model = model_of(models, "qwen3")
    options = (11, 42, 300)
    restricted = run(model, samples=6, max_new_tokens=2, temperature=1.5, options=options, seed=1)
    firsts = {int(s.generated[0]) for got in restricted.values() for s in got.samples}
    assert firsts <= set(options) and len(firsts) > 1
    greedy = run(model, samples=2, max_new_tokens=4, temperature=0.0)
    for config in (dict(top_k=1), dict(top_p=1e-6)):
        narrow = run(model, samples=2, max_new_tokens=4, temperature=1.0, seed=5, **config)
        for slot_key, got in greedy.items():
            for a, b in zip(got.samples, narrow[slot_key].samples):
                np.testing.assert_array_equal(a.generated, b.generated)


def test_hybrid_models_are_refused_in_one_line():
    spec = tiny_spec("qwen3_5_text")
    with pytest.raises(ValueError, match="Gated DeltaNet") as err:
        sampler_lib.check_supported(spec)
    assert "\n" not in str(err.value)


def test_plans_are_padded_rows_of_branches():
    """Branches are laid out by row with their prefix ends and positions; a full row splits into passes."""
    from psych201_jax.scoring import packing

    (batch,) = packing.pack(PEOPLE, [512], min_capacity=1)
    slots_of = slots_lib.slots_by_key(PEOPLE)
    plans = slots_lib.plan_batch(batch, slots_of, samples=2, capacity=4)
    assert len(plans) == 3 and all(p.prefix_end.shape == (1, 4) for p in plans)
    branches = [b for p in plans for b in p.branches if b is not None]
    assert len(branches) == 12 and len(set(branches)) == 12
    for plan in plans:
        for c, branch in enumerate(plan.branches):
            if branch is None:
                assert plan.segment[0, c] == 0
                continue
            seg = next(s for s in batch.segments if s.key == branch[0])
            person, slot = slot_of(branch[0], branch[1])
            assert plan.prefix_end[0, c] == seg.start + slot.prefix_end
            assert plan.position[0, c] == slot.prefix_end + 1
