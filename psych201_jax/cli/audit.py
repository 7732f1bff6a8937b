r"""Audit the records → token-span stage over Psych-201 data.

  psych201-audit --data=../shared/data/psych201 --tokenizer=DIR \
      --protocol=reference|robust --template=none|chat --persona=none|matched|shuffled [--out=audit.csv]

Prints a per-study table (participants, rejected, responses in the text, responses scored, lost to
truncation, missed / runaway / merged / straddle, tokens, tokens/s), writes it as CSV and lists every
rejected participant with its reason in a second CSV.
"""

import os
import time

from absl import flags, logging

from psych201_jax import defaults
from psych201_jax.cli import common
from psych201_jax.data import audit, metadata, records, spans

FLAGS = flags.FLAGS
flags.DEFINE_string("data", defaults.SAMPLE_DATA, "Study folder(s), files, comma list, or hf:<dataset>.")
flags.DEFINE_string("tokenizer", defaults.DEFAULT_TOKENIZER, "HF tokenizer directory (or a model dir).")
flags.DEFINE_enum("protocol", "reference", spans.PROTOCOLS, "Span protocol.")
flags.DEFINE_enum("template", "none", spans.TEMPLATES, "Plain text or the tokenizer's chat template.")
flags.DEFINE_enum("persona", "none", metadata.PERSONA_MODES, "Persona prefix from participant metadata.")
flags.DEFINE_integer("max_tokens", None, "Robust token budget; default: context - persona_reserve.")
flags.DEFINE_integer("persona_reserve", 512, "Robust: tokens left free for BOS, chat header, persona prefix.")
flags.DEFINE_bool(
    "strict_markers",
    None,
    "Reject imperfect markup (empty <<>>, '<<' without a space before it, "
    "unclosed final '<<'); default: only under the robust protocol, as launch.score does.",
)
flags.DEFINE_string("out", "audit.csv", "Where to write the per-study CSV (rejections go beside it).")
flags.DEFINE_integer("log_every", 2000, "Log progress every N participants.")


def resolve_tokenizer_dir(path: str) -> str:
    """Accepts a tokenizer dir, or a converted model dir holding ``tokenizer/``."""
    sub = os.path.join(path, "tokenizer")
    return sub if os.path.isdir(sub) and not os.path.isfile(os.path.join(path, "tokenizer.json")) else path


def main(argv):
    del argv
    tok_dir = resolve_tokenizer_dir(FLAGS.tokenizer)
    tok = spans.TokenizerInfo(tok_dir)
    budget = None
    if FLAGS.protocol == "robust":
        context = defaults.context_length(FLAGS.tokenizer) or defaults.context_length(tok_dir)
        budget = FLAGS.max_tokens or (context - FLAGS.persona_reserve if context else None)
        logging.info("robust token budget: %s (model context %s)", budget, context)
    protocol = spans.Protocol(FLAGS.protocol, FLAGS.template, token_budget=budget)
    audits: dict[str, audit.StudyAudit] = {}
    rejected: list[records.Rejected] = []
    start = time.perf_counter()
    count = 0

    def progress(_):
        nonlocal count
        count += 1
        if count % FLAGS.log_every == 0:
            tokens = sum(a.tokens for a in audits.values())
            elapsed = time.perf_counter() - start
            logging.info("%d participants, %d tokens, %.0f tokens/s", count, tokens, tokens / elapsed)

    strict = FLAGS.protocol == "robust" if FLAGS.strict_markers is None else FLAGS.strict_markers
    stream = spans.tokenize_records(
        records.iter_records(FLAGS.data, strict_markers=strict),
        tok,
        protocol,
        persona_of=metadata.persona_selector(FLAGS.persona, records=records.iter_records(FLAGS.data)),
    )
    for _ in audit.timed(stream, audits, rejected, progress):
        pass
    elapsed = time.perf_counter() - start
    rows = [audits[s] for s in sorted(audits)]
    print(
        f"protocol={FLAGS.protocol} template={FLAGS.template} persona={FLAGS.persona} "
        f"tokenizer={tok_dir} (sha256 {tok.sha256[:12]})"
    )
    print(audit.format_table(rows))
    print(f"wall time {elapsed:.1f}s")
    audit.write_csv(rows, FLAGS.out)
    rejected_path = os.path.splitext(FLAGS.out)[0] + "_rejected.csv"
    audit.write_rejected(rejected, rejected_path)
    print(f"wrote {FLAGS.out} and {rejected_path} ({len(rejected)} rejected)")


def run() -> None:
    """Console-script entry point."""
    common.run(main)


if __name__ == "__main__":
    run()
