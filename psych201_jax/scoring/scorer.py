"""The jitted steps of scoring: model forward and the masked log-prob head, as SPMD programs on a mesh.

There is one path for every layout: a single device is a 1 x 1 x 1 mesh. A step stacks one packed batch
per row shard (data x fsdp) along rows. Three programs:
- the forward: every layer but the last, over all positions (``Decoder.trunk``);
- the last layer and the final norm only at the plan's scored positions (``Decoder.last_layer_at``; keys
  and values still cover every position): a response is a small share of a transcript, so this saves
  most of 1 / L of the body;
- the head (``head.score_head``) under ``shard_map``, each row shard scoring its own plan with the
  vocabulary split over ``tensor``.
The first two are GSPMD-partitioned by the logical-axis rules. The forward compiles once per (rows, row
length), the last layer once per (rows, row length, plan capacity) and the head once per (plan
capacity[, option capacity K]), so a new capacity never recompiles the forward. A head returns its
outputs by name (``head.HeadOutputs``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from psych201_jax.model.decoder import Decoder
from psych201_jax.parallel import sharding
from psych201_jax.scoring import head, packing
from psych201_jax.scoring import options as options_lib
from psych201_jax.scoring.head import HeadOutputs
from psych201_jax.scoring.options import StudyOptions


class Scorer:
    """Runs packed batches through a model and the head on a mesh.

    ``mesh``: default the 1 x 1 x 1 mesh on the first local device. The model's parameters are (re)placed on
    their shardings under ``rules`` (default ``sharding.rules_for(model.spec, mesh)``; restoring with
    ``checkpoint.load_model(mesh=, rules=)`` already puts them there). ``vocab_chunk``: vocabulary columns per
    step of the head (0: ``head.default_vocab_chunk`` of the mesh's platform). ``options``: the study option
    sets (``StudyOptions``, see ``options.collect_options``), kept as ``study_options``; with them the head
    also returns ``option_argmax`` (and, with ``temperatures``, ``option_mass``); None compiles it without.
    ``temperatures``: the grid of ``nll_t`` (and ``entropy``); empty: neither.
    """

    def __init__(
        self,
        model: Decoder,
        *,
        vocab_chunk: int = 0,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | None = None,
        options: StudyOptions | None = None,
        temperatures: tuple[float, ...] = (),
    ):
        graphdef, state = nnx.split(model)
        self.final_logit_softcap = model.spec.final_logit_softcap  # the head caps the logits (Gemma 2)
        self.mesh = mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1]) if mesh is None else mesh
        self.vocab_chunk = vocab_chunk or head.default_vocab_chunk(mesh.devices.flat[0].platform)
        self.rules = tuple(rules) if rules is not None else sharding.rules_for(model.spec, mesh)
        self.layout = layout = sharding.RowLayout.create(mesh, sharding.row_axes(self.rules))
        self._graphdef = graphdef
        self._state_shardings = state_shardings = sharding.state_shardings(state, mesh, self.rules)
        self.state = jax.device_put(state, state_shardings)
        rules_ = self.rules

        def forward(state, tokens, positions, segment_ids):
            with nnx.logical_axis_rules(rules_):
                return nnx.merge(graphdef, state).trunk(tokens, positions, segment_ids)

        def last_layer(state, hidden, positions, segment_ids, score_index, score_valid):
            # Each row shard's plan indexes its own sub-batch's rows: one gather group per shard.
            groups = (score_index.reshape(layout.shards, -1), score_valid.reshape(layout.shards, -1))
            with nnx.logical_axis_rules(rules_):
                out = nnx.merge(graphdef, state).last_layer_at(hidden, positions, segment_ids, *groups)
            return out.reshape(-1, out.shape[-1])

        rows, plan, hidden = layout.rows_sharding, layout.plan_sharding, layout.hidden_sharding
        self._forward = jax.jit(forward, in_shardings=(state_shardings, rows, rows, rows), out_shardings=hidden)
        self._last_layer = jax.jit(
            last_layer,
            in_shardings=(state_shardings, hidden, rows, rows, plan, plan),
            out_shardings=layout.scored_sharding,
        )
        self._set_head(options, temperatures)

    def model(self) -> Decoder:
        """The model on its placed parameters (no copy), e.g. for the slot sampler."""
        return nnx.merge(self._graphdef, self.state)

    def with_head(self, *, options: StudyOptions | None = None, temperatures: tuple[float, ...] = ()) -> Scorer:
        """This scorer with another head (``options``: its ``StudyOptions`` or None; ``temperatures``), on the
        same placed parameters and the same compiled forward: a sweep worker's next condition restores and
        recompiles nothing but the head."""
        other = copy.copy(self)
        other._set_head(options, temperatures)
        return other

    def _set_head(self, study_options: StudyOptions | None, temperatures: tuple[float, ...]) -> None:
        mesh, layout, graphdef = self.mesh, self.layout, self._graphdef
        self.study_options = study_options
        self.temperatures = tuple(float(t) for t in temperatures)
        plan = layout.plan_sharding
        vocab_axes = sharding.vocab_axes(self.rules)
        rows_spec = jax.P(layout.axes or None)
        # target, valid, slot (+ the option inputs: option_ids [shards * K], option_mask [shards * C, K])
        n_plan = 3 if study_options is None else 5
        vocab_chunk, temps = self.vocab_chunk, self.temperatures

        def head_step(state, hidden, *plan_arrays):
            unembedding = nnx.merge(graphdef, state).unembedding()
            local = functools.partial(
                head.score_head,
                vocab_axes=vocab_axes,
                axis_sizes=dict(mesh.shape),
                vocab_chunk=vocab_chunk,
                temperatures=temps,
                softcap=self.final_logit_softcap,
            )
            # Each row shard scores its own plan on its own rows; the vocabulary stays split over vocab_axes.
            # check_vma=False: the outputs are combined over vocab_axes by hand (psum / pmax / pmin).
            # Every output (a HeadOutputs leaf) is split by rows like the plan.
            sharded = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(jax.P(layout.axes or None, None), jax.P(vocab_axes or None, None)) + (rows_spec,) * n_plan,
                out_specs=rows_spec,
                check_vma=False,
            )
            return sharded(hidden, unembedding, *plan_arrays)

        self._head = jax.jit(
            head_step,
            in_shardings=(self._state_shardings, layout.scored_sharding) + (plan,) * n_plan,
            out_shardings=plan,
        )

    def option_capacity(self, batch: packing.PackedBatch) -> int:
        """K of the batch's option ids (0 without study options)."""
        if self.study_options is None:
            return 0
        return options_lib.option_capacity(len(options_lib.batch_option_ids(batch, self.study_options)))

    def dispatch_step(
        self,
        batches: Sequence[packing.PackedBatch | None],
        *,
        rows: int,
        length: int,
        capacity: int,
        option_capacity: int = 0,
        heads: Sequence[Scorer] = (),
    ) -> list[HeadOutputs[jax.Array]]:
        """Enqueues one SPMD step (every process calls it with the same rows/length/capacity/option capacity).

        ``batches[k]``: this process's sub-batch ``layout.local_shards[k]`` ([rows, length], plan capacity
        <= ``capacity``, option capacity <= ``option_capacity``), or None for an empty one.
        ``option_capacity``: the step's K (> 0 exactly when a head has study options). ``heads``: scorers
        made by ``with_head`` from this one (default: this one), those with study options all with the same
        ``StudyOptions`` (the step builds one set of option inputs); the step runs the forward and the last
        layer once and each head on their output, each head's program exactly the one it compiles alone.
        Returns per head its global ``HeadOutputs`` ([shards * capacity] each); ``layout.local_blocks``
        gives this process's blocks.
        """
        heads = list(heads) or [self]
        layout = self.layout
        study_options = next((h.study_options for h in heads if h.study_options is not None), None)
        if len(batches) != len(layout.local_shards):
            raise ValueError(f"{len(batches)} sub-batches for {len(layout.local_shards)} local row shards")
        if (option_capacity > 0) != (study_options is not None):
            raise ValueError(f"option capacity {option_capacity}: must be > 0 exactly when a head has study options")
        if any(h._forward is not self._forward or h._last_layer is not self._last_layer for h in heads):
            raise ValueError("heads must share this scorer's forward (make them with Scorer.with_head)")
        n = len(batches)
        only = batches[0] if n == 1 else None
        if only is not None and (only.rows, only.row_length, only.capacity) == (rows, length, capacity):
            # One full sub-batch (every single-device step): its arrays are the step's, no host copies.
            host = [only.tokens, only.positions, only.segment_ids]
            plan_host = [only.score_index, only.score_target, only.score_valid, only.score_slot]
            option_host = (
                list(options_lib.option_plan(only, study_options, option_capacity)) if study_options is not None else []
            )
            return self._run(heads, host, plan_host, option_host)
        tokens, positions, segment_ids = (np.zeros((n * rows, length), np.int32) for _ in range(3))
        index, target, slot = (np.zeros(n * capacity, np.int32) for _ in range(3))
        valid = np.zeros(n * capacity, bool)
        option_ids = np.zeros(n * option_capacity, np.int32)
        option_mask = np.zeros((n * capacity, option_capacity), bool)
        for k, b in enumerate(batches):
            if b is None:
                continue
            if (b.rows, b.row_length) != (rows, length) or b.capacity > capacity:
                raise ValueError(
                    f"sub-batch shape {(b.rows, b.row_length, b.capacity)} does not fit step {(rows, length, capacity)}"
                )
            r, c = slice(k * rows, (k + 1) * rows), slice(k * capacity, k * capacity + b.capacity)
            tokens[r], positions[r], segment_ids[r] = b.tokens, b.positions, b.segment_ids
            index[c], target[c], slot[c], valid[c] = b.score_index, b.score_target, b.score_slot, b.score_valid
            if study_options is not None:
                ids = slice(k * option_capacity, (k + 1) * option_capacity)
                option_ids[ids], option_mask[c] = options_lib.option_plan(b, study_options, option_capacity)
        option_host = [option_ids, option_mask] if study_options is not None else []
        return self._run(heads, [tokens, positions, segment_ids], [index, target, valid, slot], option_host)

    def _run(
        self, heads: list[Scorer], host: list[np.ndarray], plan_host: list[np.ndarray], option_host: list[np.ndarray]
    ) -> list[HeadOutputs[jax.Array]]:
        """Places this process's rows and plan (and option inputs) as global arrays and enqueues the forward
        and the last layer, then every head."""
        layout = self.layout
        with jax.set_mesh(self.mesh):
            arrays = [layout.global_array(x, layout.rows_sharding) for x in host]
            plan = [layout.global_array(x, layout.plan_sharding) for x in plan_host]
            option_inputs = [layout.global_array(x, layout.plan_sharding) for x in option_host]
            hidden = self._forward(self.state, *arrays)
            index, target, valid, slot = plan
            scored = self._last_layer(self.state, hidden, *arrays[1:], index, valid)
            head_plan = [target, valid, slot]
            return [
                h._head(self.state, scored, *head_plan, *(option_inputs if h.study_options is not None else []))
                for h in heads
            ]

    def compilations(self) -> dict[str, int]:
        """Distinct compiled programs so far (forward per (B, L); last layer per (B, L, C); head per C)."""
        # _cache_size: a private method of jax's jitted functions, absent from their public type
        programs = {"forward": self._forward, "last_layer": self._last_layer, "head": self._head}
        return {name: fn._cache_size() for name, fn in programs.items()}  # type: ignore[attr-defined]
