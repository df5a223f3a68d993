"""The device mesh and the partition rules that place every parameter on it.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel
with parameters and optimizer state sharded), `tensor` (heads and the MLP hidden
dimension split across devices). Batches are split over `data` x `fsdp`.

Every parameter path must match exactly one rule; an unmatched parameter is an error,
never silently replicated.

Activations are pinned too (`constrain`, while a step is traced under `activations_on`):
left to propagation, XLA took the embedding's layout ([V, D] split over fsdp on D) for the
residual stream, so every fsdp device computed every token of the batch on a slice of D.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtune.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
BATCH_AND_HEADS = ("data", "fsdp", "tensor")  # a merged [batch * heads] axis

# (regex over "a/b/c" parameter paths, spec). Stacked layer parameters lead with [L].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel", P("fsdp", "tensor")),  # [D, V]
    (r"norm/weight", P(None)),  # [D]
    (r"layers/(input|post_attention)_layernorm/weight", P(None, None)),  # [L, D]
    (r"layers/self_attn/[qkv]_proj/kernel", P(None, "fsdp", "tensor", None)),  # [L, D, heads, H]
    (r"layers/self_attn/[qkv]_proj/bias", P(None, "tensor", None)),  # [L, heads, H]
    (r"layers/self_attn/o_proj/kernel", P(None, "tensor", None, "fsdp")),  # [L, N, H, D]
    (r"layers/self_attn/o_proj/bias", P(None, None)),  # [L, D]
    (r"layers/mlp/(gate|up)_proj/kernel", P(None, "fsdp", "tensor")),  # [L, D, F]
    (r"layers/mlp/(gate|up)_proj/bias", P(None, "tensor")),  # [L, F]
    (r"layers/mlp/down_proj/kernel", P(None, "tensor", "fsdp")),  # [L, F, D]
    (r"layers/mlp/down_proj/bias", P(None, None)),  # [L, D]
)


def _devices(n: int) -> str:
    return f"{n} device" + ("" if n == 1 else "s")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Fills the one -1 axis with the devices left; checks the product."""
        sizes = [self.data, self.fsdp, self.tensor]
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise UserError(f"mesh.{name} must be a positive size or -1, got {s}.")
        if sizes.count(-1) > 1:
            raise UserError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
        known = int(np.prod([s for s in sizes if s != -1]))
        available = f"{num_devices} {'is' if num_devices == 1 else 'are'} available"
        if -1 in sizes:
            if known > num_devices:
                raise UserError(f"the mesh axes given need at least {_devices(known)}, but {available}.")
            if num_devices % known:
                raise UserError(f"the mesh axes given ({_devices(known)}) do not divide the "
                                f"{_devices(num_devices)} available.")
            sizes[sizes.index(-1)] = num_devices // known
        used = int(np.prod(sizes))
        if used > num_devices:
            raise UserError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                            f"{_devices(used)}, but {available}.")
        if used < num_devices:
            raise UserError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} uses {_devices(used)}, "
                            f"but a mesh uses all {num_devices} available; set one axis to -1 to fill the rest.")
        return tuple(sizes)


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    sizes = shape.resolve(len(devices))
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def param_spec(path) -> P:
    name = path_str(path)
    matches = [spec for pattern, spec in PARTITION_RULES if re.fullmatch(pattern, name)]
    if len(matches) != 1:
        raise RuntimeError(
            f"parameter {name} matches {len(matches)} partition rules; every parameter needs exactly one"
        )
    return matches[0]


def check_divisible(path, shape, spec: P, mesh: Mesh) -> None:
    if len(spec) != len(shape):
        raise RuntimeError(f"partition rule for {path_str(path)} has rank {len(spec)}, parameter has {len(shape)}")
    for index, (dim, axis) in enumerate(zip(shape, spec)):
        axes = (axis,) if isinstance(axis, str) else (axis or ())
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if dim % size:
            over = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
            raise UserError(
                f"dimension {index} (size {dim}) of parameter {path_str(path)}, shape {tuple(shape)}, cannot be "
                f"split {size} ways over {over}; choose mesh sizes that divide it."
            )


def check_rows_per_process(mesh: Mesh, processes: int) -> None:
    """Each process feeds the rows of its own devices (`to_global_batch`), so the batch's
    device groups must not be shared between processes: tensor parallelism within a host."""
    dp = data_parallel_size(mesh)
    if dp % processes:
        raise UserError(
            f"mesh.data x mesh.fsdp = {dp} must be a multiple of the {processes} processes: each process feeds "
            "its own rows, so mesh.tensor must not span processes (keep it within a host)."
        )


def param_sharding_fn(mesh: Mesh):
    """A `sharding_fn(path, shape)` for `jaxtune.from_pretrained`."""

    def fn(path, shape):
        spec = param_spec(path)
        check_divisible(path, shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return fn


def tree_shardings(mesh: Mesh, tree):
    """NamedShardings for a pure parameter tree (arrays or ShapeDtypeStructs)."""
    fn = param_sharding_fn(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: fn(tuple(str(getattr(k, "key", k)) for k in kp), leaf.shape), tree
    )


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


_activation_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activations_on(mesh: Mesh):
    """While a step is traced in here, `constrain` pins activations to `mesh`."""
    token = _activation_mesh.set(mesh)
    try:
        yield
    finally:
        _activation_mesh.reset(token)


def activation_mesh() -> Mesh | None:
    """The mesh of the enclosing `activations_on`, if any."""
    return _activation_mesh.get()


def constrain(x: jax.Array, *spec) -> jax.Array:
    """`x` laid out as `P(*spec)` over the mesh of `activations_on`; unchanged outside it
    (a model called on its own, e.g. from `jaxtune.from_pretrained`)."""
    mesh = activation_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
