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

    The human tokens are the model's own draws at T = 0.8 (the same program's first run, from the prefixes
    of random tokens then), so they are likely enough (p_i spread over (0, 1)) for a wrong temperature to
    show."""
    model = tiny_model("llama")
    start = participant("x", 2 * SLOTS + 4, range(4, 4 + 2 * SLOTS, 2), seed=5, width=1)

    def people(tokens):
        return [
            ParticipantSpans(
                study="s",
                experiment="e",
                participant=name,
                token_ids=tokens,
                response_index=start.response_index,
                n_responses=SLOTS,
                responses_text=SLOTS,
                responses_scored=SLOTS,
                lost_truncation=0,
            )
            for name in ("t1", "t05")
        ]

    config = dict(row_lengths=(512,), samples=DRAWS, max_new_tokens=1, branch_capacity=2 * SLOTS * DRAWS)
    first = people(start.token_ids)
    drawn = run(model, people=first, temperature=0.8, seed=2, **config)
    tokens = start.token_ids.copy()
    tokens[start.response_index >= 0] = [drawn[(first[0].key, r)].samples[0].generated[0] for r in range(SLOTS)]
    final = people(tokens)
    (scored,) = stream.score_spans(final[:1], Scorer(model, temperatures=(1.0, 0.5)), row_lengths=(256,))
    p = np.exp(-scored.nll_t)  # [SLOTS, 2]
    weak = "human tokens too (un)likely: the test would be weak"
    assert (0.1 < p.mean(0)).all() and (p.mean(0) < 0.9).all() and p.std() > 0.1, weak
    out = run(model, people=final, temperature=1.0, seed=1, temperature_of={final[1].key: 0.5}, **config)
    temps = {"t1": 1.0, "t05": 0.5}
    for j, name in enumerate(temps):
        key = final[j].key
        matches = sum(
            int(s.generated[0] == out[(key, r)].human[0]) for r in range(SLOTS) for s in out[(key, r)].samples
        )
        mean, var = DRAWS * p[:, j].sum(), DRAWS * (p[:, j] * (1 - p[:, j])).sum()
        z = (matches - mean) / np.sqrt(var)
        pvalue = 2 * stats.norm.sf(abs(z))
        assert pvalue > LEVEL, (name, matches, mean, z, pvalue)
