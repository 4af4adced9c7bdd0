"""Logical axis names: declared on parameters and activations, mapped to a mesh later.

Model code names *logical* axes only ("embed", "heads", "mlp", "vocab", ...); the
training and evaluation code supplies rules mapping them to mesh axes (MaxText
style). Names live in each Variable's ``logical_axes`` metadata. (Flax's own
``out_sharding`` key is avoided on purpose: with eager sharding it demands a mesh
at construction time, which would break building models on one device.)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

LOGICAL_AXES = "logical_axes"
Rules = Sequence[tuple[str, object | None]]

_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "deltamem_logical_rules", default=None)


def logical_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for logical ``axes`` under ``rules`` (first matching rule wins).

    A mesh axis is used at most once per spec; a logical name with no rule, or
    whose mesh axis is already taken, is replicated.
    """
    table: dict[str, object] = {}
    for name, mesh_axes in rules:
        table.setdefault(name, mesh_axes)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        if any(n in used for n in names):
            names = ()
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def variable_axes(variable: nnx.Variable) -> tuple | None:
    """The logical axis names a Variable was created with (or None)."""
    return variable.get_metadata(LOGICAL_AXES, None)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for an ``nnx.State`` (or abstract state) from logical names.

    Variables without names (or scalars) are replicated.
    """
    def one(v):
        axes = variable_axes(v) if isinstance(v, nnx.Variable) else None
        ndim = len(getattr(v, "shape", ()) or ())
        if axes is None or len(axes) != ndim:
            axes = (None,) * ndim
        return NamedSharding(mesh, logical_spec(axes, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def logical_rules(rules: Rules | None) -> Iterator[None]:
    """Make ``rules`` the current rules for :func:`constrain` (activations)."""
    token = _RULES.set(tuple(rules) if rules is not None else None)
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> tuple | None:
    """The rules set by :func:`logical_rules` (None outside it)."""
    return _RULES.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Hint an activation's sharding by logical names; a no-op without rules or mesh."""
    rules = _RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, rules))
