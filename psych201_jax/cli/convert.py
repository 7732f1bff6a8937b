"""psych201-convert: convert a local Hugging Face checkpoint into this project's orbax layout.

    psych201-convert --hf=DIR --out=DIR [--dtype=bfloat16|float32] [--allow_pickle]

Reads safetensors one tensor at a time (no torch); refuses pickle ``.bin`` weights unless --allow_pickle
and configs that need remote code. Writes <out>/params (orbax), model_spec.json, tokenizer/ and
provenance.json.

example:
  psych201-convert --hf=/ckpt/Qwen3-8B-Base --out=/ckpt/converted/Qwen3-8B-Base --dtype=bfloat16
"""

from absl import flags, logging

from psych201_jax.cli import common
from psych201_jax.model import checkpoint
from psych201_jax.model import hf_weights as weights

HF = flags.DEFINE_string("hf", None, "Local HF checkpoint directory (config.json + weights).", required=True)
OUT = flags.DEFINE_string("out", None, "Output directory (its params/ must not exist yet).", required=True)
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(weights.TARGET_DTYPES), "Stored parameter dtype.")
ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow pickle .bin weights (unpickling can run code).")


def main(argv):
    del argv
    spec = checkpoint.convert(HF.value, OUT.value, DTYPE.value, allow_pickle=ALLOW_PICKLE.value)
    logging.info("converted %s (%s, %d layers) to %s", HF.value, spec.model_type, spec.num_layers, OUT.value)


def run() -> None:
    """Console-script entry point."""
    common.run(main, help_=lambda: common.help_text(__doc__ or "", __name__))


if __name__ == "__main__":
    run()
