"""The device mesh and logical-axis rules, from config; multi-host start-up.

Axis types are always passed explicitly: ``Auto`` (the compiler propagates
shardings from the annotated parameters and the ``constrain`` hints in model
code), MaxText's default.
"""

from __future__ import annotations

import logging
import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from deltamem_jax.utils.sharding import Rules, logical_spec

log = logging.getLogger(__name__)


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` when asked (before anything touches devices)."""
    d = config.distributed
    if not d.initialize:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
        if d.local_device_ids is not None:
            kwargs["local_device_ids"] = list(d.local_device_ids)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(shape, n_devices: int) -> tuple[int, ...]:
    """Resolve one -1 ("fill the rest") and check the product equals the device count."""
    shape = tuple(int(s) for s in shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh shape {shape}: {n_devices} devices are not divisible by "
                             f"the fixed axes ({known})")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices; "
                         f"{n_devices} are available")
    return shape


def build_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The mesh of ``config.mesh`` over ``devices`` (default: all, every process)."""
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(config.mesh.axes)
    shape = mesh_shape(config.mesh.shape, len(devices))
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def rules_of(config: ml_collections.ConfigDict) -> Rules:
    return tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t)
                 for name, t in config.mesh.rules)


def batch_axes_size(mesh: jax.sharding.Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (the data-parallel degree)."""
    spec = logical_spec(("batch",), rules)[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int,
                   leading: int = 0) -> NamedSharding:
    """Sharding of a ``[*leading, batch, ...]`` array: the batch axis over data-parallel axes."""
    spec = logical_spec(("batch",), rules)
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), spec[0],
                                             *([None] * (ndim - leading - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
