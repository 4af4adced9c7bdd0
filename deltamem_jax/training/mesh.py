"""The device mesh and logical-axis rules, from the mesh settings; multi-host start-up.

Axis types are always passed explicitly: ``Auto`` (the compiler propagates
shardings from the annotated parameters and the ``constrain`` hints in model
code), MaxText's default.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from deltamem_jax.training.settings import DistributedSettings, MeshSettings
from deltamem_jax.utils.sharding import Rules, logical_spec

log = logging.getLogger(__name__)


def initialize_distributed(d: DistributedSettings) -> None:
    """``jax.distributed.initialize`` when asked (before anything touches devices)."""
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


def build_mesh(mesh: MeshSettings, devices=None) -> jax.sharding.Mesh:
    """The mesh of ``mesh`` over ``devices`` (default: all, every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh.shape, len(devices))
    return jax.make_mesh(shape, mesh.axes, axis_types=(AxisType.Auto,) * len(mesh.axes),
                         devices=devices)


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
