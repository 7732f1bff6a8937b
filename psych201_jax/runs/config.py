"""Configuration of a scoring job (``psych201-score`` / ``launch.score``): the embedded default (bundled
sample + tiny model).

Override any field on the command line, e.g. ``--config.model=/ckpt/Qwen3-8B-Base
--config.data=/data/psych201 --config.protocol=robust --config.dtype=bfloat16``.
"""

import ml_collections

from psych201_jax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = defaults.DEFAULT_MODEL  # converted checkpoint, or an HF dir (converted once into cache_dir)
    # What the model is, for the analysis (set by sweep configs; never parsed from paths).
    c.model_info = ml_collections.ConfigDict(
        dict(
            hf_id="psych201_jax/tiny-qwen3",
            family="Qwen3",
            generation="tiny",
            size_b=0.0003,
            kind="base",
            base_hf_id="",
        )
    )  # kind: base | Instruction-tuned | Reasoning | Vision | Code | Math
    c.data = defaults.SAMPLE_DATA  # study folder(s), files, comma list, or hf:<dataset>
    c.out = "out/score-default"
    c.protocol = "reference"  # reference | robust
    c.template = "none"  # none | chat
    c.persona = "none"  # none | matched | shuffled (another participant of the same study)
    c.persona_subset = False  # with persona=none: only participants with metadata (the persona subset)
    c.seed = 0  # of the shuffled-persona derangement
    # none | study: also store option_argmax, the top token among the study's options (the distinct
    # single-token responses of the study, from an extra tokenization pass over the data before scoring).
    c.options = "none"
    # The head's temperature grid: NLL under softmax(logits / T) per response for each T, and the T = 1
    # entropy (and option mass with options=study), in the same vocabulary pass. default = 17 log-spaced
    # values from 0.25 to 4 (0.5, 1, 2 included); none = off; or a comma list, e.g. "0.5,1,2".
    c.temperatures = "default"
    c.dtype = "float32"  # float32 | bfloat16 (parameters and activations; log-probs always float32)
    # attention backend (psych201_jax.model.attention.available_backends()); "auto": the native kernel on a
    # one-device CPU job, else "xla"
    c.attention = "auto"
    c.max_tokens = 0  # robust token budget of experiment text; 0 = context - persona_reserve
    c.max_line_bytes = 1 << 24  # robust: an input line longer than this (16 MiB) is rejected unparsed
    c.persona_reserve = 512  # robust: tokens left free for BOS, chat header and persona prefix
    c.max_row_length = 0  # longest packed row; 0 = max(context, tokens_per_batch) (participants ≤ context)
    c.min_row_length = 2048
    c.tokens_per_batch = 131072  # rows per batch = tokens_per_batch // row length
    c.chunk_tokens = 1 << 22  # participant tokens packed together (and committed) at a time
    c.vocab_chunk = 0  # vocabulary columns per step of the head; 0 = 1,024 on CPU, 8,192 on GPU/TPU
    c.cache_dir = "~/.cache/psych201_jax/converted"  # HF dirs converted once, and tokenizer snapshots
    # JAX's persistent compilation cache (shared by every job and sweep worker of this user); "" = off.
    c.compile_cache = "~/.cache/psych201_jax/jax"
    c.fresh = False  # overwrite results of a different configuration in ``out``
    c.log_every_s = 10.0
    # Device mesh (psych201_jax/sharding.py): axis sizes, one may be -1 (= the remaining devices).
    # mode: auto = a mesh when there is more than one device or process, else the single-device path;
    # on = always a mesh (also on one device, to compare with mode=off); off = the single-device path.
    # With a mesh, tokens_per_batch is per row shard (data x fsdp shards run one packed batch each per step).
    c.mesh = ml_collections.ConfigDict(dict(mode="auto", data=-1, fsdp=1, tensor=1))
    # Multiple processes (psych201_jax/distributed.py). mode: auto = initialise jax.distributed when a
    # coordinator/num_processes is given or SLURM/Open MPI/GKE-TPU is detected; on = always (TPU pods:
    # jax finds everything itself); off = never. coordinator "host:port", num_processes, process_id
    # (-1 = detect) and local_device_ids ("0,1"; "" = all) are for clusters jax cannot detect (CPU tests).
    c.distributed = ml_collections.ConfigDict(
        dict(mode="auto", coordinator="", num_processes=0, process_id=-1, local_device_ids="")
    )
    return c
