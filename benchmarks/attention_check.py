r"""Every attention backend on this machine's accelerator against the ``xla`` reference: max |Δ|, ms per call.

  .venv/bin/python -m benchmarks.attention_check                      # GPU / TPU: the realistic sizes below
  .venv/bin/python -m benchmarks.attention_check --lengths=8192 --windows=none --out=attn.json

On a GPU or TPU the defaults are packed rows of B=1, T=8192 and 16384, Hq=32, Hk=8, head_dim=128, bfloat16,
20 participants (segments) per row filling ~97% of it, without and with a 4096-token sliding window (OLMo 3).
Backends: the registered ones runnable here (``xla``, plus ``splash`` on TPU, ``pallas_gpu`` and ``cudnn`` on
GPU). On CPU the size drops to T=1024, Hq=4, Hk=2 and the TPU/GPU Pallas kernels run in interpret mode
(parity only; their timings mean nothing); ``cudnn`` is skipped.

Per backend and case it prints
  d_xla     max |out - xla| over real tokens, same bf16 inputs;
  d_f32     max |out - xla in float32 at highest matmul precision| (the better reference);
  leak      max |Δ| of every other segment's outputs after replacing one segment's q/k/v (must be 0);
  ms        median wall time per jitted call (``--iters`` calls after a warm-up), compile excluded;
  TFLOP/s   useful attention FLOPs (4·hd·Hq per visible query-key pair, segment/causal/window-aware) per s.
A backend that cannot run a case (e.g. ``pallas_gpu`` with a window) prints why instead.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from psych201_jax.model import attention as attn_lib
from psych201_jax.model import kernels as ak

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", None, "Row lengths T (default 8192,16384 on GPU/TPU, 1024 on CPU).")
flags.DEFINE_integer("batch", 1, "Rows per call.")
flags.DEFINE_list("heads", None, "Query,key/value heads (default 32,8; 4,2 on CPU).")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("segments", None, "Participants per row (default 20; 6 on CPU).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
flags.DEFINE_list("windows", None, "Sliding windows, 'none' for full causal (default none,4096; none,256 on CPU).")
flags.DEFINE_list("backends", None, "Backends to run (default: every one runnable here).")
flags.DEFINE_integer("iters", None, "Timed calls per case (default 10; 2 on CPU).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", "", "Optional JSON file for the numbers.")


def packed_row_ids(t: int, n_segments: int, rng, fill: float = 0.97) -> np.ndarray:
    """int32[T]: n contiguous segments of random lengths (ids 1..n) filling ``fill`` of the row, then padding."""
    w = rng.dirichlet(np.full(n_segments, 2.0))
    lengths = np.maximum(1, np.floor(w * fill * t)).astype(int)
    ids = np.zeros(t, np.int32)
    pos = 0
    for i, n in enumerate(lengths):
        ids[pos : pos + n] = i + 1
        pos += n
    return ids


def visible_pairs(seg: np.ndarray, window: int | None) -> int:
    """Query-key pairs a segment-aware kernel must compute: per segment of length n, sum_i min(i + 1, W)."""
    total = 0
    for row in seg:
        _, counts = np.unique(row[row != 0], return_counts=True)
        for n in counts.tolist():
            i = np.arange(n)
            total += int(np.minimum(i + 1, window if window else n).sum())
    return total


def _time(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, 1e3 * float(np.median(times))


def backend_fns(platform: str, names: list[str] | None):
    """name -> (label, fn(q, k, v, seg, sliding_window)); interpret-mode kernels on CPU."""
    fns = {}
    runnable = set(attn_lib.runnable_backends()) - {"dense"}
    for name in attn_lib.available_backends():
        if name == "dense" or (names and name not in names):
            continue
        if name in runnable:
            fns[name] = (
                name,
                lambda q, k, v, s, w, name=name: attn_lib.attention(q, k, v, s, sliding_window=w, backend=name),
            )
        elif platform == "cpu" and name == "splash":
            fns[name] = (
                "splash (interpret)",
                lambda q, k, v, s, w: ak.splash_attention(q, k, v, s, sliding_window=w, interpret=True),
            )
        elif platform == "cpu" and name == "pallas_gpu":
            fns[name] = (
                "pallas_gpu (interpret)",
                lambda q, k, v, s, w: ak.pallas_gpu_attention(q, k, v, s, sliding_window=w, interpret=True),
            )
        else:
            fns[name] = (name, None)  # registered, not runnable here
    return fns


def main(argv):
    del argv
    platform = jax.default_backend()
    cpu = platform == "cpu"
    lengths = [int(x) for x in (FLAGS.lengths or (["1024"] if cpu else ["8192", "16384"]))]
    hq, hk = (int(x) for x in (FLAGS.heads or (["4", "2"] if cpu else ["32", "8"])))
    n_seg = FLAGS.segments or (6 if cpu else 20)
    windows = [
        None if w.lower() == "none" else int(w)
        for w in (FLAGS.windows or (["none", "256"] if cpu else ["none", "4096"]))
    ]
    iters = FLAGS.iters or (2 if cpu else 10)
    dtype = jnp.dtype(FLAGS.dtype)
    hd, b = FLAGS.head_dim, FLAGS.batch
    device = jax.devices()[0]
    print(
        f"device: {device.platform} {getattr(device, 'device_kind', '')}  jax {jax.__version__}  "
        f"B={b} Hq={hq} Hk={hk} hd={hd} {dtype.name} segments/row={n_seg} iters={iters}"
    )
    fns = backend_fns(platform, FLAGS.backends)
    rng = np.random.default_rng(FLAGS.seed)
    results = []
    header = f"{'T':>6} {'window':>6}  {'backend':<24}{'d_xla':>10}{'d_f32':>10}{'leak':>8}{'ms':>10}{'TFLOP/s':>9}"
    print(header)
    print("-" * len(header))
    for t in lengths:
        seg_np = np.stack([packed_row_ids(t, n_seg, rng) for _ in range(b)])
        seg = jnp.asarray(seg_np)
        key = jax.random.key(FLAGS.seed + t)
        kq, kk, kv, kq2, kk2, kv2 = jax.random.split(key, 6)
        shape_q, shape_kv = (b, t, hq, hd), (b, t, hk, hd)
        q, q2 = (jax.random.normal(x, shape_q, dtype) for x in (kq, kq2))
        k, k2 = (jax.random.normal(x, shape_kv, dtype) for x in (kk, kk2))
        v, v2 = (jax.random.normal(x, shape_kv, dtype) for x in (kv, kv2))
        target = seg_np == 2  # the segment whose tokens are replaced in the leak check
        tj = jnp.asarray(target)[:, :, None, None]
        qm, km, vm = (jnp.where(tj, y, x) for x, y in ((q, q2), (k, k2), (v, v2)))
        real = seg_np != 0
        others = real & ~target
        for window in windows:
            flops = 4.0 * hd * hq * visible_pairs(seg_np, window)
            xla_fn = jax.jit(lambda q, k, v, s, w=window: attn_lib.attention(q, k, v, s, sliding_window=w))
            ref_bf = np.asarray(xla_fn(q, k, v, seg), np.float32)
            with jax.default_matmul_precision("highest"):
                f32 = jax.jit(
                    lambda q, k, v, s, w=window: attn_lib.attention(
                        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), s, sliding_window=w
                    )
                )
                ref_32 = np.asarray(f32(q, k, v, seg))
            for name, (label, fn) in fns.items():
                row = dict(T=t, window=window, backend=label)
                if fn is None:
                    row["skipped"] = f"needs {ak.PLATFORM_OF.get(name, '?').upper()}, this is {platform}"
                    print(f"{t:>6} {str(window):>6}  {label:<24}skipped: {row['skipped']}")
                    results.append(row)
                    continue
                try:
                    jfn = jax.jit(lambda q, k, v, s, fn=fn, w=window: fn(q, k, v, s, w))
                    start = time.perf_counter()
                    jax.block_until_ready(jfn(q, k, v, seg))
                    compile_s = time.perf_counter() - start
                    out, ms = _time(jfn, (q, k, v, seg), iters)
                    out = np.asarray(out, np.float32)
                    changed = np.asarray(jfn(qm, km, vm, seg), np.float32)
                except Exception as e:  # noqa: BLE001 - report and go on with the other backends
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    print(f"{t:>6} {str(window):>6}  {label:<24}{row['error']}")
                    results.append(row)
                    continue
                row.update(
                    d_xla=float(np.abs(out - ref_bf)[real].max()),
                    d_f32=float(np.abs(out - ref_32)[real].max()),
                    leak=float(np.abs(changed - out)[others].max()),
                    ms=ms,
                    compile_s=compile_s,
                    finite=bool(np.isfinite(out).all()),
                    padding_zero=bool((out[~real] == 0).all()),
                    tflops=flops / (ms * 1e-3) / 1e12,
                )
                flag = "" if row["finite"] and row["padding_zero"] and row["leak"] == 0 else "  <-- CHECK"
                print(
                    f"{t:>6} {str(window):>6}  {label:<24}{row['d_xla']:>10.2e}{row['d_f32']:>10.2e}"
                    f"{row['leak']:>8.0e}{ms:>10.2f}{row['tflops']:>9.2f}{flag}"
                )
                results.append(row)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(
                dict(
                    device=f"{device.platform} {getattr(device, 'device_kind', '')}",
                    jax=jax.__version__,
                    batch=b,
                    heads=[hq, hk],
                    head_dim=hd,
                    dtype=dtype.name,
                    segments=n_seg,
                    results=results,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    app.run(main)
