"""The results manifest of a job: what determines its numbers (fingerprinted) and its provenance."""

import dataclasses
import json
import math
import os
import time

import jax

from psych201_jax.conditions import ModelInfo, Persona
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint
from psych201_jax.model.spec import ModelSpec
from psych201_jax.runs import store
from psych201_jax.runs.config import UNKNOWN_MODEL, ScoreJob

# Version of the persona-value rule (reference: eval_meta.py's literal != "N/A", markers kept and counted;
# robust: N/A / nan / n/a / empty missing, markers broken up).
PERSONA_VALUES_RULE = 2


def model_identity(job: ScoreJob, model_dir: str) -> ModelInfo:
    """The job's model info. Where its hf_id is empty, the model's own: what the converted checkpoint
    records (``provenance.json``'s ``model_info``), else the name of the HF directory it was converted from;
    never another model's. Fields the job sets explicitly are kept."""
    given = job.model_info
    if given.hf_id:
        return given
    with open(os.path.join(model_dir, checkpoint.PROVENANCE)) as fh:
        provenance = json.load(fh)
    recorded = provenance.get("model_info")
    if isinstance(recorded, dict) and recorded.get("hf_id"):
        own = ModelInfo.from_mapping(recorded)
    else:
        source = str(provenance.get("source") or model_dir)
        own = ModelInfo(hf_id=os.path.basename(os.path.normpath(source)))
    changes = {}
    for name in ModelInfo.FIELDS[1:]:
        value, unset = getattr(given, name), getattr(UNKNOWN_MODEL, name)
        if not (value == unset or (isinstance(value, float) and math.isnan(value) and math.isnan(unset))):
            changes[name] = value
    return dataclasses.replace(own, **changes)


def build_manifest(
    job: ScoreJob, model_dir: str, spec: ModelSpec, tok: TokenizerInfo, rules: spans.SpanRules, n_input: int | None
) -> dict:
    """The manifest of ``job``: the determinants (a changed input file, model or tokenizer never resumes stale
    results), their fingerprint, provenance and ``n_input`` input participants."""
    with open(os.path.join(model_dir, checkpoint.PROVENANCE)) as fh:
        provenance = json.load(fh)
    c = job.condition
    determinants = {
        "model": os.path.abspath(model_dir),
        "model_sources": provenance.get("sha256"),
        "tokenizer_sha256": tok.sha256,
        "data": c.data,
        "data_sources": records.source_fingerprints(c.data),
        "protocol": rules.protocol.value,
        "template": rules.template.value,
        "persona": c.persona.value,
        "persona_subset": c.persona_subset,
        "persona_seed": job.persona_seed,
        "token_budget": rules.token_budget,
        "max_chars": rules.max_chars,
        "dtype": c.dtype.value,
        "options": c.options.value,
        "temperatures": list(c.temperatures),
    }
    if c.persona != Persona.NONE or c.persona_subset:
        # Which metadata values enter a persona and how their markers are written (metadata.is_known,
        # persona_prefix): a change of that rule must not resume results scored under the previous one.
        determinants["persona_values"] = PERSONA_VALUES_RULE
    return {
        "fingerprint": store.fingerprint(determinants),
        "n_input": n_input,
        "determinants": determinants,
        "model": {"dir": os.path.abspath(model_dir), "spec": dataclasses.asdict(spec), "provenance": provenance},
        "tokenizer": {"dir": tok.path, "sha256": tok.sha256},
        "config": job.to_dict(),
        "code_version": store.code_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
