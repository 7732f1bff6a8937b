"""Slot sampling (psych201_jax/sampling): branches decoded on a shared prefill against the scorer and HF
``generate``, packing invariance, no leakage across participants or past a slot, stopping, per-participant
temperature and options, top-k / top-p, and Qwen3.5's Gated DeltaNet hybrid path.

Tiny random models are built in JAX from the tiny families' HF configs (``tiny_models``) and rescaled as
the parity checkpoints are (unit-gain projections, peaked outputs), so a wrong key or a missing mask shows
in the log-probs; the HF comparisons convert an HF model's own weights (``hf_and_ours``). Participants are
synthetic token sequences with response runs. Runs of one model structure and shape share one compiled
program (``sampler._programs``), so the tests align their shapes where they can.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoConfig

from psych201_jax.model import hf_config, hf_weights
from psych201_jax.model import spec as modelspec
from psych201_jax.model.decoder import Decoder
from psych201_jax.model.params import BIASES
from psych201_jax.sampling import sampler as sampler_lib
from psych201_jax.sampling import slots as slots_lib
from psych201_jax.sampling.sampler import SamplingConfig, sample_participants
from psych201_jax.scoring import stream
from psych201_jax.scoring.scorer import Scorer
from psych201_jax.testing import tiny_models
from psych201_jax.types import ParticipantSpans

VOCAB = 512
REF_LENGTH = 256  # the scorer's row length (one compilation for every branch)
FAN_IN = {"wq": 1, "wk": 1, "wv": 1, "w_gate": 1, "w_up": 1, "w_down": 1, "wo": 2, "router": 1, "shared_gate": 1}
FAN_IN.update(d_gate=1, d_up=1, d_down=1)
# Config overrides of the tiny models here: Qwen3-MoE's middle layer dense by config (mlp_only_layers).
OVERRIDES = {"qwen3_moe": dict(num_hidden_layers=3, mlp_only_layers=[1])}
EXPERTS = ("e_gate", "e_up", "e_down")  # [L, E, in, out]: the fan-in is the next-to-last axis


@dataclasses.dataclass(frozen=True)
class Participant:
    key: tuple
    token_ids: np.ndarray
    response_index: np.ndarray
    n_responses: int


def tiny_spec(family: str) -> modelspec.ModelSpec:
    """The spec of ``family``'s tiny config (``tiny_models``) with a 512-token vocabulary."""
    kwargs = {
        **tiny_models._COMMON,
        "vocab_size": VOCAB,
        **tiny_models._FAMILY_DEFAULTS[family],
        **OVERRIDES.get(family, {}),
    }
    return hf_config.from_hf_config(AutoConfig.for_model(family, **kwargs))


def tiny_model(family: str, seed: int = 0) -> Decoder:
    """A float32 Decoder of ``family``'s tiny config (vocabulary 512), weights drawn as the parity checkpoints'."""
    spec = tiny_spec(family)
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
        if name in EXPERTS:
            return rng.normal(0, 1 / np.sqrt(shape[-2]), shape)
        return rng.normal(0, 1 / np.sqrt(np.prod(shape[1 : FAN_IN[name] + 1])), shape)

    def walk(tree):
        return {k: walk(v) if isinstance(v, dict) else jnp.asarray(draw(k, v), jnp.float32) for k, v in tree.items()}

    return _fill(spec, walk)


def _fill(spec: modelspec.ModelSpec, params) -> Decoder:
    """A float32 Decoder of ``spec`` with the parameters ``params(abstract pure dict)`` returns (no random
    init: its eager ops cost more than the tests' compilations)."""
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: Decoder(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    )
    nnx.replace_by_pure_dict(state, params(nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


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


def scorer_log_probs(model, sequences) -> list[np.ndarray]:
    """The scorer's (``scoring.stream``, the masked log-prob head) log-prob of each generated token of each
    (prefix, generated) pair: every generated token is scored as a one-token response of its own."""
    items = []
    for i, (prefix, generated) in enumerate(sequences):
        n = len(generated)
        items.append(
            ParticipantSpans(
                study="s",
                experiment="e",
                participant=str(i),
                token_ids=np.concatenate([prefix, generated]).astype(np.int32),
                response_index=np.concatenate([np.full(len(prefix), -1), np.arange(n)]).astype(np.int32),
                n_responses=n,
                responses_text=n,
                responses_scored=n,
                lost_truncation=0,
            )
        )
    results = stream.score_spans(items, Scorer(model), row_lengths=(REF_LENGTH,), tokens_per_batch=4 * REF_LENGTH)
    return [-r.nll for r in results]


def slot_of(key, response):
    person = next(p for p in PEOPLE if p.key == key)
    slot = next(
        s for s in slots_lib.participant_slots(key, person.token_ids, person.response_index) if s.response == response
    )
    return person, slot


def run(model, people=PEOPLE, row_lengths=(512,), temperature_of=None, options_of=None, **config):
    return sample_participants(
        model,
        people,
        SamplingConfig(**config),
        row_lengths=row_lengths,
        temperature_of=temperature_of,
        options_of=options_of,
    )


# --- 1 and 5: the shared-prefill decode equals the scorer ------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2", "qwen3_moe"])
def test_each_step_log_prob_equals_the_scorer(models, family):
    """Issue 30 item 5: every branch's per-step log-probs (and so each sample's stored log-probability) equal
    what the scorer gives (prefix up to p + the sampled tokens) within 1e-5, drawn at T = 0.7; mistral (a
    64-token window everywhere) and gemma2 (windows, attention and final soft caps, query scale) have slots beyond the
    window, and mistral's branches run past it, so a window off by a step, on the prefix or on the generated
    tokens, or a missing cap shows."""
    model = model_of(models, family)
    n_new = 72 if family == "mistral" else 8  # past the window: its own oldest tokens drop out of it too
    # T = 0.7: the stored log-probs are still the model's own (T = 1), as the scorer's
    out = run(model, samples=2, max_new_tokens=n_new, temperature=0.7, seed=3, branch_capacity=8)
    assert len(out) == 6
    pairs, samples = [], []
    for (key, response), got in out.items():
        person, slot = slot_of(key, response)
        np.testing.assert_array_equal(got.human, person.token_ids[person.response_index == response])
        for sample in got.samples:
            assert sample.stop == sampler_lib.STOP_LENGTH and len(sample.generated) == n_new
            pairs.append((person.token_ids[: slot.prefix_end + 1], sample.generated))
            samples.append(sample)
    scored = scorer_log_probs(model, pairs)
    worst = max(float(np.abs(lp - s.logprobs).max()) for lp, s in zip(scored, samples))
    assert worst <= 1e-5, worst
    assert max(abs(lp.sum() - s.logprob) for lp, s in zip(scored, samples)) <= 1e-5 * n_new


class _StateDictReader:
    """``hf_weights.converted_params``'s reader over an in-memory torch state dict."""

    def __init__(self, state_dict):
        self.tensors = {k: v.detach().float().numpy() for k, v in state_dict.items()}

    def names(self) -> set[str]:
        return set(self.tensors)

    def read(self, key: str) -> np.ndarray:
        return self.tensors[key]


def hf_and_ours(family: str):
    """(HF torch model, our float32 Decoder) with the same weights: ``family``'s tiny config rescaled as the
    parity checkpoints are, converted by the checkpoint converter's mapping (``converted_params``)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {**tiny_models._COMMON, "vocab_size": VOCAB, **tiny_models._FAMILY_DEFAULTS[family]}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    zero_centred = family in tiny_models.ZERO_CENTRED
    tiny_models._rescale(hf, config.hidden_size, config.tie_word_embeddings, 3.0, zero_centred=zero_centred)
    spec = hf_config.from_hf_config(config)

    def params(tree):
        for path, x in hf_weights.converted_params(_StateDictReader(hf.state_dict()), spec, "float32"):
            node = tree
            for name in path[:-1]:
                node = node[name]
            node[path[-1]] = jnp.asarray(x)
        return tree

    return hf, _fill(spec, params)


def hf_greedy(hf, prefix: np.ndarray, n: int) -> np.ndarray:
    """HF ``generate(do_sample=False)``'s n new tokens after ``prefix``."""
    import torch

    ids = torch.as_tensor(prefix, dtype=torch.long)[None]
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0, ids.shape[1] :].numpy()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "olmo2"])
def test_greedy_slots_equal_hf_generate(family):
    """Issue 30 item 5: greedy decoding from every slot of PEOPLE (prefixes past gemma2's 64-token window)
    equals HF ``generate(do_sample=False)`` on the prefix up to and including the slot's opening marker,
    token for token. (The run's shapes are the scorer test's: one decode compilation per family.)"""

    hf, ours = hf_and_ours(family)
    out = run(ours, samples=2, max_new_tokens=8, temperature=0.0, seed=3, branch_capacity=8)
    assert len(out) == 6
    distinct = set()
    for (key, response), got in out.items():
        person, slot = slot_of(key, response)
        ref = hf_greedy(hf, person.token_ids[: slot.prefix_end + 1], 8)
        for sample in got.samples:
            np.testing.assert_array_equal(sample.generated, ref, err_msg=f"{family} slot {key, response}")
        distinct.add(tuple(ref))
    assert len(distinct) == 6, "greedy continuations repeat: the comparison is too weak to fail"


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
    config = dict(
        samples=2, max_new_tokens=4, temperature=1.0, row_lengths=(160,), branch_capacity=8
    )  # the leak test's
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


def test_a_branch_never_sees_its_own_response_or_anything_after_it(models, monkeypatch):
    """Issue 30 item 5 (leakage): a's tokens from its second response on are redrawn; the branches of its
    first two slots (prefix ends 9 and 69) keep every bit, the third's change. The same check run with the
    prefix mask widened by one position (the branch also sees the first token of its own response) fires,
    so it catches that leak."""
    model = model_of(models, "llama")
    a = PEOPLE[0]
    tokens = a.token_ids.copy()
    tokens[70:] = np.random.default_rng(11).integers(5, 500, len(tokens) - 70)
    changed = dataclasses.replace(a, token_ids=tokens)
    config = dict(samples=2, max_new_tokens=4, temperature=1.0, row_lengths=(160,), branch_capacity=8)

    def unchanged_slots():
        before, after = run(model, people=(a,), **config), run(model, people=(changed,), **config)
        return [
            all(
                np.array_equal(x.generated, y.generated) and np.array_equal(x.logprobs, y.logprobs)
                for x, y in zip(before[(a.key, r)].samples, after[(a.key, r)].samples)
            )
            for r in range(a.n_responses)
        ]

    assert unchanged_slots() == [True, True, False]

    real = sampler_lib.attention_at_lse

    def widened(q, at, kv, **kwargs):  # the last visible key one position later: the response's first token
        return real(q, (at[0] + 1, *at[1:]), kv, **kwargs)

    monkeypatch.setattr(sampler_lib, "attention_at_lse", widened)
    sampler_lib._programs.cache_clear()  # compiled programs hold the real mask
    try:
        assert unchanged_slots()[1] is False, "a mask widened by one position went unnoticed"
    finally:
        sampler_lib._programs.cache_clear()


# --- 4: stopping -----------------------------------------------------------------------------------------


def test_stops_at_the_closing_marker_a_stop_token_or_the_length(models):
    """Greedy continuations are known in advance: a closing marker made of two of their tokens ends each
    branch there (marker excluded from the response), one token as EOS ends it before that token, and
    without either it runs to max_new_tokens."""
    model = model_of(models, "llama")
    person = PEOPLE[2]
    # the scorer test's shapes (one compiled program): every slot of PEOPLE, read c's
    free = run(model, samples=2, max_new_tokens=8, temperature=0.0, branch_capacity=8)[(person.key, 0)].samples[0]
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


def test_top_k_and_top_p(models):
    """top-k 1 and a tiny top-p leave the best token only: greedy's samples (first-token options: see
    test_per_participant_temperature_and_options). Both runs share one compiled program (top-k and top-p
    are inputs), the greedy one the scorer test's."""
    model = model_of(models, "qwen3")
    shape = dict(samples=2, max_new_tokens=8, branch_capacity=8)
    greedy = run(model, temperature=0.0, **shape)
    for config in (dict(top_k=1), dict(top_p=1e-6)):
        narrow = run(model, temperature=1.0, seed=5, **shape, **config)
        for slot_key, got in greedy.items():
            for a, b in zip(got.samples, narrow[slot_key].samples):
                np.testing.assert_array_equal(a.generated, b.generated)


def test_per_participant_temperature_and_options(models):
    """``temperature_of`` / ``options_of``: c samples greedily (T = 0) while b samples at T = 2 with its first
    token among 3 ids and a among 1 (K = 4 for the batch); each participant's samples equal those of a run
    where its setting is the global config's, whatever the others' settings and the batch's K."""
    model = model_of(models, "qwen3")
    a, b, c = PEOPLE
    opts_a, opts_b = (42,), (11, 42, 300)
    base = dict(samples=4, max_new_tokens=3, seed=4, branch_capacity=16)
    mixed = sample_participants(
        model,
        PEOPLE,
        SamplingConfig(temperature=1.0, **base),
        row_lengths=(512,),
        temperature_of={c.key: 0.0, b.key: 2.0},
        options_of={a.key: opts_a, b.key: opts_b, c.key: ()},
    )
    alone = {
        a.key: run(model, people=(a,), temperature=1.0, options=opts_a, **base),
        b.key: run(model, people=(b,), temperature=2.0, options=opts_b, **base),
        c.key: run(model, people=(c,), temperature=0.0, **base),
    }
    for (key, response), got in mixed.items():
        for x, y in zip(got.samples, alone[key][(key, response)].samples):
            np.testing.assert_array_equal(x.generated, y.generated)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    firsts = {
        p.key: {int(s.generated[0]) for (k, _), got in mixed.items() if k == p.key for s in got.samples} for p in PEOPLE
    }
    assert firsts[a.key] == {42} and firsts[b.key] <= set(opts_b) and len(firsts[b.key]) > 1
    for response in range(c.n_responses):  # greedy: every sample of a slot alike
        assert len({tuple(s.generated) for s in mixed[(c.key, response)].samples}) == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample_participants(model, PEOPLE[:1], SamplingConfig(), row_lengths=(512,), options_of={a.key: (VOCAB,)})
    with pytest.raises(ValueError, match="temperatures must be"):
        sample_participants(model, PEOPLE[:1], SamplingConfig(), row_lengths=(512,), temperature_of={a.key: -1.0})


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_qwen3_5_hybrid_equals_the_scorer_and_hf_generate(family):
    """Gated DeltaNet hybrids (Qwen3.5: 6 linear-attention layers, 2 gated softmax ones; Qwen3.5-MoE: every MLP
    routed): b and c packed in one row (c's recurrent state must restart at its segment), drawn at T = 0.7,
    every step's log-prob equals the scorer's within 1e-5; greedy equals HF ``generate`` token for token (one
    compiled program for both)."""
    hf, model = hf_and_ours(family)
    config = dict(people=PEOPLE[1:], row_lengths=(160,), samples=2, max_new_tokens=6, seed=3, branch_capacity=8)
    drawn, greedy = run(model, temperature=0.7, **config), run(model, temperature=0.0, **config)
    assert len(drawn) == 3
    pairs, samples = [], []
    for (key, response), got in drawn.items():
        person, slot = slot_of(key, response)
        pairs += [(person.token_ids[: slot.prefix_end + 1], s.generated) for s in got.samples]
        samples += got.samples
    worst = max(float(np.abs(lp - s.logprobs).max()) for lp, s in zip(scorer_log_probs(model, pairs), samples))
    assert worst <= 1e-5, worst
    for (key, response), got in greedy.items():
        person, slot = slot_of(key, response)
        ref = hf_greedy(hf, person.token_ids[: slot.prefix_end + 1], 6)
        np.testing.assert_array_equal(got.samples[0].generated, ref, err_msg=f"slot {key, response}")


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
