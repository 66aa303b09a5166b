"""Device meshes, and where parameters and batches live on them.

A mesh has three axes:
  data    batches: prompts, classifier-free-guidance branches, refiner chunks
  fsdp    parameters split along their input features (ZeRO-3: XLA gathers a layer's
          weights where it is used); batches are split over it too
  tensor  parameters split along their output features
Mesh specs such as "data=-1,fsdp=4,tensor=1" give the sizes; -1 takes the devices left.

Logical axis rules map the names every parameter carries (see `st2v_jax.models.layers`
and `st2v_jax.models.clip`) and the activation name "batch" to mesh axes. A dimension the
named mesh axes do not divide stays whole on every device (e.g. a 4-channel conv_in under
fsdp=8), so every rule set works with every model.

    python -m st2v_jax.parallel --config configs/streaming_t2v_components.py --mesh fsdp=8

prints the bytes each device holds per component, computed from shapes alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# (logical name, mesh axes): the parameter names of st2v_jax.models, plus "batch".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("channels_in", "fsdp"),
    ("channels_out", "tensor"),
    ("vocab", "fsdp"),
    ("conv_taps", None),
    ("channels", None),
    ("positions", None),
)
Rules = Sequence[tuple[str, Any]]


class MeshSpecError(ValueError):
    """A mesh spec that names unknown axes or does not fit the devices."""


def parse_mesh_spec(spec: str, device_count: int) -> dict[str, int]:
    """"data=-1,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1} on 8 devices."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise MeshSpecError(f"mesh spec {spec!r}: {part!r} should be AXIS=SIZE with AXIS one of {MESH_AXES}")
        if name in sizes:
            raise MeshSpecError(f"mesh spec {spec!r} names {name!r} twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshSpecError(f"mesh spec {spec!r}: the size of {name!r} should be an integer (or -1), got {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise MeshSpecError(f"mesh spec {spec!r}: {name}={sizes[name]}; sizes are positive, or -1 for the devices left")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshSpecError(f"mesh spec {spec!r}: only one axis can be -1, got {fill}")
    if not fill and "data" not in sizes:
        sizes["data"], fill = -1, ["data"]  # unnamed devices go to data parallelism
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if device_count % fixed:
        raise MeshSpecError(f"mesh spec {spec!r} needs a multiple of {fixed} devices; there are {device_count}")
    if fill:
        sizes[fill[0]] = device_count // fixed
    elif fixed != device_count:
        raise MeshSpecError(f"mesh spec {spec!r} covers {fixed} devices; there are {device_count} (use -1 for one axis)")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str = "data=-1", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over `devices` (default: all of them, every host's) laid out for the topology."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: shardings propagate through jit (GSPMD) from the inputs and constraints.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _mesh_axes(logical: Optional[str], rules: Rules) -> tuple[str, ...]:
    for name, axes in rules:
        if name == logical:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def partition_spec(names: Sequence[Optional[str]], shape: Sequence[int], axis_sizes: Mapping[str, int], rules: Rules) -> PartitionSpec:
    """Mesh axes of each dimension: the rule's axes that divide it, each mesh axis used once."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        chosen: list[str] = []
        for axis in _mesh_axes(name, rules):
            if axis in used or axis_sizes.get(axis, 1) == 1:
                continue
            if size % (math.prod(axis_sizes[a] for a in chosen) * axis_sizes[axis]) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _is_boxed(leaf: Any) -> bool:
    return isinstance(leaf, nn.Partitioned)


def partition_specs(abstract_params: Any, axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> Any:
    """PartitionSpecs of a tree of boxed (logically named) parameters; unnamed ones replicate."""

    def spec(leaf: Any) -> PartitionSpec:
        if _is_boxed(leaf):
            return partition_spec(leaf.names, leaf.value.shape, axis_sizes, rules)
        return PartitionSpec()

    return jax.tree.map(spec, abstract_params, is_leaf=_is_boxed)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def named_shardings(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(batch: int, axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The leading (batch) dimension over the "batch" rule's axes that divide it."""
    return partition_spec(("batch",), (batch,), axis_sizes, rules)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and its rules: where a model's params, batches and results live.

    Hashable, so a denoiser that carries it stays a static part of a jitted loop.
    """

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __post_init__(self) -> None:
        # Rules read from a config file arrive as lists; tuples keep the placement hashable.
        frozen = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in self.rules)
        object.__setattr__(self, "rules", frozen)

    @property
    def replicated(self) -> NamedSharding:
        """Whole on every device: what the host reads back (every process of a slice needs it)."""
        return NamedSharding(self.mesh, PartitionSpec())

    def constrain_batch(self, x: jax.Array) -> jax.Array:
        """Inside jit: splits x's leading (batch) axis over the mesh's batch axes."""
        spec = batch_spec(x.shape[0], axis_sizes(self.mesh), self.rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def shard_model(self, model: Any) -> tuple[Any, dict]:
        """A `PretrainedModel` with its params laid out by their logical axes, and those
        shardings ({component: tree}). No unsharded copy stays referenced. Refuses execution
        options that cannot run over this mesh (the splash kernel)."""
        model.execution.check_platform(devices=self.mesh.size)
        specs = {name: partition_specs(model.abstract_params(name), axis_sizes(self.mesh), self.rules) for name in model.params}
        shardings = named_shardings(self.mesh, specs)
        return dataclasses.replace(model, params=place_on_mesh(model.params, shardings)), shardings


def place_on_mesh(tree: Any, shardings: Any) -> Any:
    """Arrays every process holds whole (host or one-device arrays) -> global arrays laid
    out by `shardings`, each process keeping only its own devices' pieces. Unlike
    `jax.device_put`, this works when the mesh spans hosts: nothing crosses between them."""

    def place(array: Any, sharding: NamedSharding) -> jax.Array:
        whole = np.asarray(array)
        return jax.make_array_from_callback(whole.shape, sharding, lambda index: whole[index])

    return jax.tree.map(place, tree, shardings)


def constrain_batch(x: jax.Array, placement: Optional[Placement]) -> jax.Array:
    """`placement.constrain_batch(x)`, or x as it is when nothing is placed."""
    return x if placement is None else placement.constrain_batch(x)


def replicated(placement: Optional[Placement]) -> Optional[NamedSharding]:
    return None if placement is None else placement.replicated


def bytes_per_device(shapes: Any, specs: Any, axis_sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of arrays (or ShapeDtypeStructs) laid out by `specs`."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
        shard = list(leaf.shape)
        for dim, axes in enumerate(spec):
            if axes is not None:
                names = (axes,) if isinstance(axes, str) else axes
                shard[dim] = -(-shard[dim] // math.prod(axis_sizes[a] for a in names))
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def _memory_table(configs: Mapping[str, Any], sizes: Mapping[str, int], rules: Rules) -> str:
    from st2v_jax.convert.components import COMPONENTS

    rows = ["| component | parameters | total (fp32) | per device | share |", "|---|---|---|---|---|"]
    totals = [0, 0, 0]
    for name, config in configs.items():
        boxed = COMPONENTS[name].abstract_params(COMPONENTS[name].parse_config(config))
        specs = partition_specs(boxed, sizes, rules)
        shapes = nn.unbox(boxed)
        count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
        whole, mine = bytes_per_device(shapes, specs, {a: 1 for a in sizes}), bytes_per_device(shapes, specs, sizes)
        rows.append(_memory_row(name, count, whole, mine))
        totals = [t + v for t, v in zip(totals, (count, whole, mine))]
    rows.append(_memory_row("**all**", *totals))
    return "\n".join(rows)


def _memory_row(name: str, count: int, whole: int, mine: int) -> str:
    return f"| {name} | {count / 1e6:,.1f} M | {whole / 2**20:,.1f} MiB | {mine / 2**20:,.1f} MiB | 1/{whole / mine:.2f} |"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="component configs (.py with get_config(), e.g. configs/streaming_t2v_components.py)")
    parser.add_argument("--mesh", default="fsdp=8", help="mesh spec, e.g. data=2,fsdp=4 (default fsdp=8)")
    args = parser.parse_args(argv)
    from st2v_jax.config_files import load_config_file
    from st2v_jax.convert.components import split_model_config

    configs, _ = split_model_config(load_config_file(args.config).to_dict())
    fixed = [int(p.partition("=")[2]) for p in args.mesh.split(",") if "=" in p and p.partition("=")[2].strip() != "-1"]
    try:
        sizes = parse_mesh_spec(args.mesh, math.prod(fixed) if fixed else 1)
    except MeshSpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"mesh {sizes}, rules {dict(DEFAULT_RULES)}\n")
    print(_memory_table(configs, sizes, DEFAULT_RULES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
