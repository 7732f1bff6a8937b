"""Issue 30 item 5, the sampler's statistics: the empirical exact-match rate of single-token responses
agrees with the scorer's exp(-NLL_T) (tiny random llama of tests/test_sampling.py)."""

import numpy as np
from scipy import stats
from test_sampling import participant, run, tiny_model

from psych201_jax.scoring import stream
from psych201_jax.scoring.scorer import Scorer
from psych201_jax.types import ParticipantSpans

SLOTS = 64  # single-token responses of the match-rate test
DRAWS = 24  # samples per slot
LEVEL = 1e-3  # two-sided


def test_single_token_match_rate_agrees_with_the_scorer():
    """For single-token responses the expected number of samples equal to the human token is
    k * sum_i exp(-NLL_T,i), NLL_T,i the scorer's ``nll_t`` of response i at temperature T: the count over
    64 slots x 24 samples must agree with it by a two-sided z-test on the Poisson-binomial count (normal
    approximation, variance k * sum p_i (1 - p_i)), p > 0.001, at T = 1 and T = 0.5 (one run, the second
    participant's temperature from ``temperature_of``).

    The transcript is the model's own continuation of one token at T = 1.5, so the human tokens are
    likely enough (p_i spread over (0, 1)) for a wrong temperature to show."""
    model = tiny_model("llama")
    seed_person = participant("seed", 3, [1], seed=5, width=1)
    (drawn,) = run(model, people=(seed_person,), samples=1, max_new_tokens=2 * SLOTS + 4, temperature=1.5).values()
    tokens = np.concatenate([seed_person.token_ids[:1], drawn.samples[0].generated]).astype(np.int32)
    index = np.full(len(tokens), -1, np.int32)
    index[4 : 4 + 2 * SLOTS : 2] = np.arange(SLOTS)

    def spans(name):
        return ParticipantSpans(
            study="s",
            experiment="e",
            participant=name,
            token_ids=tokens,
            response_index=index,
            n_responses=SLOTS,
            responses_text=SLOTS,
            responses_scored=SLOTS,
            lost_truncation=0,
        )

    people = [spans("t1"), spans("t05")]
    temps = {"t1": 1.0, "t05": 0.5}
    (scored,) = stream.score_spans(people[:1], Scorer(model, temperatures=(1.0, 0.5)), row_lengths=(256,))
    p = np.exp(-scored.nll_t)  # [SLOTS, 2]
    assert 0.1 < p.mean() < 0.9 and p.std() > 0.1, "human tokens too (un)likely: the test would be weak"
    out = run(
        model,
        people=people,
        row_lengths=(512,),
        samples=DRAWS,
        max_new_tokens=1,
        temperature=1.0,
        seed=1,
        branch_capacity=2 * SLOTS * DRAWS,
        temperature_of={people[1].key: 0.5},
    )
    for j, name in enumerate(temps):
        key = people[j].key
        matches = sum(
            int(s.generated[0] == out[(key, r)].human[0]) for r in range(SLOTS) for s in out[(key, r)].samples
        )
        mean, var = DRAWS * p[:, j].sum(), DRAWS * (p[:, j] * (1 - p[:, j])).sum()
        z = (matches - mean) / np.sqrt(var)
        pvalue = 2 * stats.norm.sf(abs(z))
        assert pvalue > LEVEL, (name, matches, mean, z, pvalue)
