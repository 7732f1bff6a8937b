"""Study option sets, and each batch's option inputs for the head.

A study's option set is the distinct token ids of its single-token responses (``collect_options``; all
studies' sets: ``StudyOptions``). With them the head also reports, per scored token, the option argmax
(the top token among the option set of the participant's study); a batch carries the union of its
studies' option sets as the head's option inputs (``option_plan``: option_ids [K], K a power of two
>= 32, and an option_mask [C, K] of which are in each plan entry's study's set).

(The job's ``config.options`` mode, none | study, decides whether a condition's head gets them.)
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import cast

import numpy as np
from absl import logging

from psych201_jax.scoring import packing
from psych201_jax.types import ParticipantKey, ParticipantSpans, Rejected

StudyOptions = dict[str, np.ndarray]  # study -> its option set: int32 [n] ascending token ids

MAX_OPTIONS = 256  # option ids kept per study
MIN_OPTION_CAPACITY = 32  # smallest K of a batch's option ids


def collect_options(items: Iterable[ParticipantSpans | Rejected], max_options: int = MAX_OPTIONS) -> StudyOptions:
    """The option set of each study: the distinct token ids of its single-token responses.

    A single-token response has exactly one scored token (position >= 1, as ``packing`` scores them).
    Returns study -> int32 [n] ascending ids (n = 0 when it has none) for every study with a participant
    in ``items`` (rejections are skipped). Above ``max_options`` ids a study keeps the most frequent
    (ties: the lowest ids), with a warning.
    """
    counts: dict[str, collections.Counter] = {}
    for p in items:
        if not isinstance(p, ParticipantSpans):
            continue
        study = counts.setdefault(p.study, collections.Counter())
        response = np.asarray(p.response_index)[1:]
        scored = response >= 0
        response, tokens = response[scored], np.asarray(p.token_ids)[1:][scored]
        single = np.bincount(response, minlength=p.n_responses)[response] == 1
        study.update(tokens[single].tolist())
    out = {}
    for name, study in sorted(counts.items()):
        ids = sorted(study, key=lambda t: (-study[t], t))
        if len(ids) > max_options:
            logging.warning(
                "study %s has %d distinct single-token responses; its options are the %d most frequent",
                name,
                len(ids),
                max_options,
            )
            ids = ids[:max_options]
        out[name] = np.asarray(sorted(ids), np.int32)
    return out


def batch_option_ids(batch: packing.PackedBatch, study_options: StudyOptions) -> np.ndarray:
    """int32 [n]: ascending union of the option sets of the studies the batch scores (a participant key is
    (study, experiment, participant), see ``ParticipantSpans.key``)."""
    studies = {cast(ParticipantKey, key)[0] for key, _ in batch.slot_keys}
    ids = [study_options[s] for s in studies if s in study_options]
    return np.unique(np.concatenate(ids)).astype(np.int32) if ids else np.zeros(0, np.int32)


def option_capacity(n: int) -> int:
    """Static K for n option ids: the next power of two, at least ``MIN_OPTION_CAPACITY``."""
    return max(MIN_OPTION_CAPACITY, 1 << max(0, n - 1).bit_length())


def option_plan(
    batch: packing.PackedBatch, study_options: StudyOptions, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The head's option inputs for the batch: option_ids int32 [K] (``batch_option_ids``, padded with 0)
    and option_mask bool [C, K]: which of them are in the option set of each entry's study (none for
    padding entries). K: ``k`` or the batch's own ``option_capacity``."""
    union = batch_option_ids(batch, study_options)
    k = option_capacity(len(union)) if k is None else k
    if len(union) > k:
        raise ValueError(f"{len(union)} option ids do not fit an option capacity of {k}")
    ids = np.zeros(k, np.int32)
    ids[: len(union)] = union
    studies = sorted({cast(ParticipantKey, key)[0] for key, _ in batch.slot_keys})
    per_study = np.zeros((len(studies) + 1, k), bool)  # the last row: no options (padding entries)
    for i, study in enumerate(studies):
        per_study[i, : len(union)] = np.isin(union, study_options.get(study, ()))
    slot_study = np.asarray([studies.index(cast(ParticipantKey, key)[0]) for key, _ in batch.slot_keys], np.int64)
    entry_study = np.full(batch.capacity, len(studies))
    valid = batch.score_valid
    entry_study[valid] = slot_study[batch.score_slot[valid]]
    return ids, per_study[entry_study]
