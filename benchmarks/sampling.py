r"""Slot sampling benchmark: our sampler (``psych201_jax.sampling``) against HF ``generate``, same weights.

  python -m benchmarks.sampling [--data=DIR] [--slots=32] [--samples=8] [--max_new_tokens=16] [--json=PATH]
  python -m benchmarks.sampling --smoke --json=PATH        # tiny: the code paths only, in under a minute

CI runs ``compare`` through the device check's dry run (its ``simulate`` stage, tests/test_device_check.py).

Both sides draw ``--samples`` continuations of the same ``--slots`` response slots of real Psych-201
transcripts (a slot's prefix: the participant's history up to its ``<<``; ``--per_participant`` slots spread
over each transcript, prefixes of at most ``--max_prefix`` tokens), temperature 1, no top-k / top-p, at most
``--max_new_tokens`` tokens, stopping at the closing marker ``>>`` or EOS. Ours: one prefill per packed row
(each participant cut after its last chosen slot), every branch of a row decoded together. HF (transformers,
PyTorch, sdpa): the prefixes sorted by length, ``--hf_batch`` of them left-padded per call,
``generate(do_sample=True, num_return_sequences=k, use_cache=True)`` with a per-sequence marker stop.
Counted on both sides: generated tokens up to and including the marker or stop token (all of them when
none came: a random model rarely draws ``>>``); tokens/s and slots/s are over the whole sampling wall time,
prefill included. Ours is timed steady (a second pass; the first compiles) and with compilation; HF after a
warm-up call. Peak memory: the largest resident-set growth during each side's pass (CPU; on a GPU, the
device's peak bytes). ``max_abs_delta_logprob_vs_hf``: our recorded log-probabilities of one slot's samples
against HF's forward on them (the same weights, so ~1e-5 in float32). The model, random: ``--family=qwen3``
(default) Qwen3-shaped; ``--family=qwen3_5_text`` a Qwen3.5-shaped Gated DeltaNet hybrid of the same widths
(``QWEN3_5``: three linear-attention layers then one gated full-attention layer; ours recovers each slot's
recurrent state from the row's prefill, ``psych201_jax/sampling/hybrid.py``; HF runs its torch fallback of the
delta rule, so keep its sizes small, e.g. ``--slots=16 --samples=4 --max_new_tokens=8 --max_prefix=512``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Hashable

import jax
import numpy as np
from absl import app, flags

from psych201_jax import defaults
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint
from psych201_jax.sampling import slots as slots_lib
from psych201_jax.sampling.sampler import SamplingConfig, SlotSampler
from psych201_jax.scoring import packing
from psych201_jax.testing import tiny_models, torch_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The measured model: Qwen3-shaped, 4 layers of width 256 (8/4 heads of 64) and the real 151,936-token
# vocabulary (the head weighs as in a small released model); --smoke: 2 layers of width 64.
QWEN3 = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    vocab_size=151936,
)
SMOKE = {**QWEN3, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SMOKE |= {"num_key_value_heads": 2, "head_dim": 16}


def _rope_3_5(mrope_section: list[int]) -> dict:
    """Qwen3.5's RoPE: partial (a quarter of each head), interleaved multimodal sections (equal positions on
    text, so the sections only have to cover the rotary half-dims)."""
    return dict(
        rope_type="default",
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        mrope_section=mrope_section,
        mrope_interleaved=True,
    )


# --family=qwen3_5_text: Qwen3.5's layout at the same widths (attention 8/4 heads of 64, intermediate 768, the
# real vocabulary), 4 layers = 3 Gated DeltaNet + 1 gated full attention (full_attention_interval 4). Linear
# heads: transformers' Qwen3.5 default (16 key / 32 value heads of 128 at width 4,096: values as wide as the
# model, keys half) scaled to width 256: 2 key / 4 value heads of 64; conv kernel 4. Partial RoPE on a quarter
# of the 64-dim heads: 16 dims, mrope sections 3/3/2. --smoke: width 64, 4 layers (attention 4/2 heads of 16,
# linear 2/4 heads of 16).
QWEN3_5: dict = {
    **QWEN3,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "rope_parameters": _rope_3_5([3, 3, 2]),
}
SMOKE_QWEN3_5 = {**QWEN3_5, **SMOKE, "num_hidden_layers": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
SMOKE_QWEN3_5["rope_parameters"] = _rope_3_5([2, 1, 1])  # 8 rotary dims of 16
# --family -> (the measured shape, the --smoke shape).
SHAPES = {"qwen3": (QWEN3, SMOKE), "qwen3_5_text": (QWEN3_5, SMOKE_QWEN3_5)}


@dataclasses.dataclass(frozen=True)
class Cut:
    """A participant cut after its last chosen slot (what the sampler packs): as ``packing.pack`` reads it."""

    key: Hashable
    token_ids: np.ndarray
    response_index: np.ndarray
    n_responses: int


def choose_slots(
    data: str, tokenizer: TokenizerInfo, n_slots: int, per_participant: int, max_prefix: int
) -> tuple[list[Cut], dict[Hashable, list[slots_lib.Slot]]]:
    """``n_slots`` slots of real transcripts, participants round-robin over studies (a realistic mix), up to
    ``per_participant`` evenly spread slots each with prefixes of at most ``max_prefix`` tokens. Returns the
    cut participants and key -> chosen slots."""
    studies = sorted(s for s in os.listdir(data) if os.path.isdir(os.path.join(data, s)))
    iters = [records.iter_records(os.path.join(data, s)) for s in studies]
    rules, cuts, total = spans.SpanRules("reference"), [], 0
    slots_of: dict[Hashable, list[slots_lib.Slot]] = {}
    while total < n_slots and iters:
        for it in list(iters):
            record = next(it, None)
            if record is None:
                iters.remove(it)
                continue
            for p in spans.tokenize_records([record], tokenizer, rules):
                if not isinstance(p, spans.ParticipantSpans) or total >= n_slots:
                    continue
                key = (p.study, p.experiment, p.participant)
                found = slots_lib.participant_slots(key, p.token_ids, p.response_index)
                found = [s for s in found if s.prefix_end < max_prefix]
                if not found:
                    continue
                take = min(per_participant, len(found), n_slots - total)
                chosen = [found[i] for i in np.linspace(0, len(found) - 1, take).round().astype(int)]
                end = chosen[-1].prefix_end + 1
                cuts.append(Cut(key, p.token_ids[:end], p.response_index[:end], p.n_responses))
                slots_of[key] = chosen
                total += take
    return cuts, slots_of


class PeakMemory:
    """Peak memory growth over a block: resident set size polled every 2 ms on CPU; with ``device`` (a
    torch CUDA device or "jax"), the device's peak bytes in use instead."""

    def __init__(self, device: str = "cpu"):
        self.device, self.peak_bytes = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.device == "cpu":
            self._start, self._top, self._stop = self._rss(), 0, threading.Event()

            def poll():
                while not self._stop.wait(0.002):
                    self._top = max(self._top, self._rss())

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self.device == "jax":  # the process's peak so far: the caller runs this stage first
            self.peak_bytes = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, max(self._top, self._rss()) - self._start)  # 0: it reused freed memory


def ours_pass(sampler: SlotSampler, batches, slots_of) -> list:
    """Every chosen slot's ``SlotSamples`` (one pass over the packed batches)."""
    out = []
    for batch in batches:
        if not batch.overflow_pass:  # the same rows again (scoring's plan overflow): sampled already
            out += sampler.sample_batch(batch, slots_of)
    return out


class _Marker:
    """HF stopping criterion: a sequence is done when its newest tokens are the closing marker's ids."""

    def __new__(cls, close_ids, prompt_len: int):
        import torch
        from transformers import StoppingCriteria

        class Marker(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                n = len(close_ids)
                if not n or input_ids.shape[1] - prompt_len < n:
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                return (input_ids[:, -n:] == torch.as_tensor(close_ids, device=input_ids.device)).all(-1)

        return Marker()


def count_generated(tokens: np.ndarray, close_ids: tuple[int, ...], stop_ids: tuple[int, ...]) -> int:
    """Tokens generated up to and including the first closing marker or stop token (all when none)."""
    n = len(close_ids)
    for j, t in enumerate(tokens.tolist()):
        if t in stop_ids or (n and j + 1 >= n and tuple(tokens[j + 1 - n : j + 1].tolist()) == close_ids):
            return j + 1
    return len(tokens)


def hf_pass(model, prefixes: list[np.ndarray], cfg: SamplingConfig, batch: int, device: str) -> tuple[int, list]:
    """HF ``generate`` over the prefixes (sorted by length, ``batch`` per call, left-padded): (generated
    tokens counted as ours, per prefix its k generated rows)."""
    import torch
    from transformers import StoppingCriteriaList

    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    generated: list = [None] * len(prefixes)
    total = 0
    with torch.inference_mode():
        for g in range(0, len(order), batch):
            group = order[g : g + batch]
            t = max(len(prefixes[i]) for i in group)
            ids = torch.zeros((len(group), t), dtype=torch.long)
            mask = torch.zeros((len(group), t), dtype=torch.long)
            for r, i in enumerate(group):
                ids[r, t - len(prefixes[i]) :] = torch.as_tensor(np.asarray(prefixes[i], np.int64))
                mask[r, t - len(prefixes[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=cfg.temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=cfg.samples,
                max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=0,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=list(cfg.stop_ids) or None,
                stopping_criteria=StoppingCriteriaList([_Marker(cfg.close_ids, t)]),
            )
            new = out[:, t:].cpu().numpy().reshape(len(group), cfg.samples, -1)
            for r, i in enumerate(group):
                generated[i] = [row[: count_generated(row, cfg.close_ids, cfg.stop_ids)] for row in new[r]]
                total += sum(len(x) for x in generated[i])
    return total, generated


def logprob_check(model, prefix: np.ndarray, samples, device: str) -> float:
    """Largest |our recorded log-prob - HF's| over one slot's samples (HF forward on prefix + sample)."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for s in samples:
            ids = torch.as_tensor(np.concatenate([prefix, s.generated]).astype(np.int64), device=device)[None]
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            n = len(prefix)
            theirs = logp[n - 1 : n - 1 + len(s.generated)].gather(-1, ids[0, n:, None])[:, 0].cpu().numpy()
            worst = max(worst, float(np.max(np.abs(theirs - s.logprobs), initial=0.0)))
    return worst


def compare(
    ours_model, hf_model, cuts, slots_of, cfg: SamplingConfig, *, hf_batch: int, rows_per_batch: int, repeats: int = 1
) -> dict:
    """Both samplers on the same slots: wall times, tokens, tokens/s, slots/s, peak memory, the ratios.
    Ours packs the cut participants into rows of one length (the longest, rounded up to 256 tokens),
    ``rows_per_batch`` rows a batch; ``cfg.branch_capacity``: branches per row and decode pass."""
    device = str(next(hf_model.parameters()).device.type)
    row = -(-max(len(c.token_ids) for c in cuts) // 256) * 256  # one row length: one compiled shape
    batches = packing.pack(cuts, (row,), tokens_per_batch=row * rows_per_batch, min_capacity=1)
    sampler = SlotSampler(ours_model, cfg)
    by_key = {c.key: c for c in cuts}
    prefixes = [by_key[k].token_ids[: s.prefix_end + 1] for k, got in slots_of.items() for s in got]
    n_slots = len(prefixes)
    start = time.perf_counter()
    first = ours_pass(sampler, batches, slots_of)
    first_s = time.perf_counter() - start
    print(f"ours: first pass (compiling) {first_s:.1f} s; {len(batches)} packed batches", flush=True)
    hf_pass(hf_model, prefixes[:1], dataclasses.replace(cfg, max_new_tokens=2), 1, device)  # warm-up
    ours_s = hf_s = float("inf")
    ours_mem, hf_mem = PeakMemory("jax" if device == "cuda" else "cpu"), PeakMemory(device)
    for _ in range(max(1, repeats)):  # interleaved, best of each: a shared CPU's speed drifts
        with ours_mem:
            start = time.perf_counter()
            got = ours_pass(sampler, batches, slots_of)
            ours_s = min(ours_s, time.perf_counter() - start)
        with hf_mem:
            start = time.perf_counter()
            hf_tokens, _ = hf_pass(hf_model, prefixes, cfg, hf_batch, device)
            hf_s = min(hf_s, time.perf_counter() - start)
        print(f"steady pass: ours {ours_s:.1f} s, HF {hf_s:.1f} s", flush=True)
    ours_tokens = sum(len(s.generated) for slot in got for s in slot.samples)
    assert len(got) == n_slots and len(first) == n_slots, (len(got), len(first), n_slots)
    one = got[0]
    check = logprob_check(
        hf_model, by_key[one.key].token_ids[: slots_of[one.key][0].prefix_end + 1], one.samples, device
    )
    return {
        "slots": n_slots,
        "participants": len(cuts),
        "samples": cfg.samples,
        "max_new_tokens": cfg.max_new_tokens,
        "prefix_tokens_mean": float(np.mean([len(p) for p in prefixes])),
        "prefix_tokens_max": int(max(len(p) for p in prefixes)),
        "packed_batches": len(batches),
        "counted": "generated tokens up to and including >> or EOS (all when neither came); prefill in the time",
        "ours_s": ours_s,
        "ours_first_pass_s": first_s,  # the same pass with every program compiling
        "ours_tokens": ours_tokens,
        "ours_tokens_per_s": ours_tokens / ours_s,
        "ours_slots_per_s": n_slots / ours_s,
        "ours_peak_memory_bytes": ours_mem.peak_bytes,
        "hf_s": hf_s,
        "hf_batch": hf_batch,
        "hf_tokens": hf_tokens,
        "hf_tokens_per_s": hf_tokens / hf_s,
        "hf_slots_per_s": n_slots / hf_s,
        "hf_peak_memory_bytes": hf_mem.peak_bytes,
        "hf_device": device,
        "speedup_slots_per_s": hf_s / ours_s,
        "speedup_tokens_per_s": (ours_tokens / ours_s) / (hf_tokens / hf_s),
        "max_abs_delta_logprob_vs_hf": check,
    }


def build(family: str, shape: dict, tmp: str, dtype: str, device: str = "cpu"):
    """One random HF checkpoint of ``shape`` (the bundled Qwen3 tokenizer) and our conversion of it: (ours,
    the HF torch model on ``device``), the same weights."""
    hf_dir = tiny_models.make_tiny_hf_checkpoint(
        family, os.path.join(tmp, "hf"), defaults.DEFAULT_TOKENIZER, dtype=dtype, **shape
    )
    conv = os.path.join(tmp, "conv")
    checkpoint.convert(hf_dir, conv, dtype)
    return load(hf_dir, conv, dtype, device)


def load(hf_dir: str, conv: str, dtype: str, device: str = "cpu"):
    """(ours from the converted ``conv``, the HF torch model of ``hf_dir`` on ``device``, sdpa)."""
    model, _ = checkpoint.load_model(conv, dtype=dtype)
    hf_model = torch_reference.load_hf_model(hf_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    return model, hf_model


def config(tokenizer: TokenizerInfo, samples: int, max_new_tokens: int, branch_capacity: int) -> SamplingConfig:
    """Temperature 1, no top-k / top-p; stops at ``>>`` (the tokenizer's ids) or its EOS."""
    eos = tokenizer.hf.eos_token_id
    return SamplingConfig(
        samples=samples,
        max_new_tokens=max_new_tokens,
        branch_capacity=branch_capacity,
        close_ids=tokenizer.base_r_id,
        stop_ids=() if eos is None else (int(eos),),
    )


def table(r: dict) -> str:
    """The result as a small text table."""
    mib = 1 << 20
    lines = [
        f"{r['slots']} slots x {r['samples']} samples, <= {r['max_new_tokens']} new tokens; prefixes "
        f"{r['prefix_tokens_mean']:.0f} tokens on average (max {r['prefix_tokens_max']}); {r['counted']}",
        f"{'':>10} {'seconds':>9} {'tokens':>8} {'tokens/s':>10} {'slots/s':>9} {'peak MiB':>9}",
    ]
    for side in ("ours", "hf"):
        lines.append(
            f"{side:>10} {r[side + '_s']:>9.2f} {r[side + '_tokens']:>8} {r[side + '_tokens_per_s']:>10.1f} "
            f"{r[side + '_slots_per_s']:>9.2f} {r[side + '_peak_memory_bytes'] / mib:>9.1f}"
        )
    lines.append(
        f"ours / HF: {r['speedup_slots_per_s']:.2f}x slots/s, {r['speedup_tokens_per_s']:.2f}x tokens/s; ours with "
        f"compilation {r['ours_first_pass_s']:.2f} s; max |dlogprob| vs HF {r['max_abs_delta_logprob_vs_hf']:.1e}"
    )
    return "\n".join(lines)


def _define_flags() -> None:
    """The command's flags (defined only when run as a script: the device check imports this module)."""
    default_data = os.path.join(REPO, "..", "shared", "data", "psych201")
    if not os.path.isdir(default_data):
        default_data = os.path.join(REPO, "tests", "data", "psych201")
    flags.DEFINE_string("data", default_data, "Psych-201 studies (default: the full corpus, else the vendored one).")
    flags.DEFINE_integer("slots", 32, "Response slots sampled (--smoke: 4).")
    flags.DEFINE_integer("per_participant", 4, "Slots per participant, spread over its transcript.")
    flags.DEFINE_integer("max_prefix", 1024, "Longest slot prefix in tokens (--smoke: 256).")
    flags.DEFINE_integer("samples", 8, "k: samples per slot.")
    flags.DEFINE_integer("max_new_tokens", 16, "M: most tokens generated per sample (--smoke: 4).")
    flags.DEFINE_integer("hf_batch", 4, "Prefixes per HF generate call (times k sequences).")
    flags.DEFINE_integer("rows_per_batch", 8, "Packed rows per batch of ours (--smoke: 1).")
    flags.DEFINE_integer("repeats", 1, "Steady passes of each side, interleaved; the best of each is kept.")
    flags.DEFINE_enum("family", "qwen3", sorted(SHAPES), "Model shape: Qwen3 (softmax) or the Qwen3.5 hybrid.")
    flags.DEFINE_string("json", "", "Optional JSON output path.")
    flags.DEFINE_bool("smoke", False, "Tiny model, few slots and tokens: the code paths only (CI).")


def main(argv):
    del argv
    f = flags.FLAGS
    smoke = f.smoke
    tokenizer = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    slots, max_prefix = (min(f.slots, 4), min(f.max_prefix, 256)) if smoke else (f.slots, f.max_prefix)
    max_new = min(f.max_new_tokens, 4) if smoke else f.max_new_tokens
    cfg = config(tokenizer, f.samples, max_new, f.samples * f.per_participant)  # a participant's branches
    cuts, slots_of = choose_slots(f.data, tokenizer, slots, f.per_participant, max_prefix)
    shape = SHAPES[f.family][1 if smoke else 0]
    with tempfile.TemporaryDirectory() as tmp:
        model, hf_model = build(f.family, shape, tmp, "float32")
    rows = 1 if smoke else f.rows_per_batch
    result = compare(model, hf_model, cuts, slots_of, cfg, hf_batch=f.hf_batch, rows_per_batch=rows, repeats=f.repeats)
    out = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "smoke": smoke,
        "family": f.family,
        "model": {k: v for k, v in shape.items() if k != "max_position_embeddings"},
        **result,
    }
    print(table(out))
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
