"""The train state: planned abstractly first, then created directly in its shardings.

Only δ-mem parameters are trained: they and their optimiser state form the
:class:`TrainState`; the frozen backbone is a separate argument of the step,
never in the optimiser, never checkpointed. Everything is first computed with
``nnx.eval_shape`` (no allocation) so that shardings are known before any array
exists; arrays are then created by ``jax.jit(..., out_shardings=...)``, each
device holding only its part.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deltamem_jax.checkpoints.hf import read_backbone_state
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.memory.layer import MemoryParam
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.training.mesh import replicated
from deltamem_jax.training.settings import OptimSettings
from deltamem_jax.utils.sharding import Rules, state_shardings


class TrainState(NamedTuple):
    step: jax.Array           # int32 scalar: optimiser steps taken
    params: Any               # nnx.State of the δ-mem parameters (MemoryParam)
    opt_state: Any            # optax state over params only
    rng: jax.Array            # typed PRNG key


@dataclasses.dataclass
class ModelPlan:
    """Shapes and shardings of the model, before anything is allocated."""

    decoder: DecoderConfig
    memory: DeltaMemConfig
    graphdef: Any              # the full model (backbone + δ-mem)
    backbone_graphdef: Any     # the backbone alone
    abstract_params: Any       # δ-mem parameters (ShapeDtypeStructs)
    abstract_frozen: Any       # backbone parameters (ShapeDtypeStructs)
    param_shardings: Any
    frozen_shardings: Any

    def merge(self, params, frozen) -> DecoderLM:
        return nnx.merge(self.graphdef, params, frozen)


def plan_model(decoder: DecoderConfig, memory: DeltaMemConfig, mesh, rules: Rules) -> ModelPlan:
    full = nnx.eval_shape(lambda: DecoderLM(decoder, rngs=nnx.Rngs(0), memory=memory))
    graphdef, params, _ = nnx.split(full, MemoryParam, ...)
    backbone_graphdef, frozen = nnx.split(
        nnx.eval_shape(lambda: DecoderLM(decoder, rngs=nnx.Rngs(0))))
    return ModelPlan(decoder, memory, graphdef, backbone_graphdef, params, frozen,
                     state_shardings(params, mesh, rules), state_shardings(frozen, mesh, rules))


def load_frozen(plan: ModelPlan, hf_dir: str, seed: int = 0):
    """The backbone's weights: read from ``hf_dir``, or a seeded random init if empty."""
    if hf_dir:
        return read_backbone_state(hf_dir, plan.decoder, _copy_abstract(plan.abstract_frozen),
                                   plan.frozen_shardings)

    def init():
        return nnx.state(DecoderLM(plan.decoder, rngs=nnx.Rngs(seed)))
    return jax.jit(init, out_shardings=plan.frozen_shardings)()


def init_params(plan: ModelPlan, frozen, seed: int):
    """Fresh δ-mem parameters (``base_slice`` inits read the frozen weights), sharded."""
    def init(frozen):
        model = nnx.merge(plan.backbone_graphdef, frozen)
        model.attach_memory(plan.memory, rngs=nnx.Rngs(seed))
        return nnx.state(model, MemoryParam)
    return jax.jit(init, out_shardings=plan.param_shardings)(frozen)


def make_optimizer(o: OptimSettings, total_steps: int):
    """AdamW with warm-up then cosine/linear/constant; global-norm clipping. Returns (tx, lr)."""
    warmup = int(math.ceil(o.warmup_ratio * total_steps))
    peak, end = o.learning_rate, o.learning_rate * o.end_lr_ratio
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                end)
    else:
        after = (optax.linear_schedule(peak, end, max(1, total_steps - warmup))
                 if o.schedule == "linear" else optax.constant_schedule(peak))
        lr = optax.join_schedules([optax.linear_schedule(0.0, peak, max(1, warmup)), after],
                                  [warmup])
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*parts), lr


def state_shardings_of(plan: ModelPlan, tx, mesh) -> TrainState:
    """Shardings of the whole :class:`TrainState` (optimiser moments follow their params)."""
    abstract_opt = jax.eval_shape(tx.init, plan.abstract_params)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, plan.param_shardings,
                                transform_non_params=lambda _: replicated(mesh),
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
    return TrainState(replicated(mesh), plan.param_shardings, opt, replicated(mesh))


def init_train_state(plan: ModelPlan, params, tx, seed: int, shardings: TrainState) -> TrainState:
    def init(params):
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                          jax.random.key(seed))
    return jax.jit(init, out_shardings=shardings)(params)


def abstract_train_state(plan: ModelPlan, tx, seed: int, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: restore and dry-run targets."""
    shapes = jax.eval_shape(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.key(seed)),
        plan.abstract_params)
    return with_shardings(shapes, shardings)


def with_shardings(shapes, shardings):
    """Attach shardings (a prefix tree) to a tree of ShapeDtypeStructs."""
    def attach(sharding, subtree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            subtree)
    return jax.tree.map(attach, shardings, shapes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def _copy_abstract(state):
    return jax.tree.map(lambda x: x, state)


def host_params(params) -> Any:
    """δ-mem parameters as host numpy arrays on every process (gathered if sharded)."""
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return jax.device_get(params)
    return multihost_utils.process_allgather(params, tiled=True)
