"""Logical axis names of the parameters (docs/model.md). The training code maps them to mesh axes with a rule table.

Every parameter carries its names as NNX `sharding_names` metadata (stored as `out_sharding`, no eager sharding).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec

# The fixed set of logical axis names used by the model's parameters (None = never sharded). 'layers' is the leading
# stacking axis of scanned layers (ModelConfig.scan_layers); it is never sharded (each scan step reads one layer).
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "vision_embed", "vision_mlp", "norm",
                "layers")
NEVER_SHARDED = ("layers",)


def logical_partition_specs(state) -> nnx.State:
    """PartitionSpec pytree (same structure as `state`, e.g. `nnx.state(model, nnx.Param)` or an abstract state
    from `nnx.eval_shape`) whose entries are logical axis names."""
    return nnx.get_partition_spec(state)


def logical_to_mesh(specs, rules: dict[str, str | tuple | None]):
    """Maps logical names to mesh axes with `rules` (missing names and NEVER_SHARDED -> None, i.e. replicated)."""
    def one(p):
        if not isinstance(p, PartitionSpec):
            return p
        return PartitionSpec(*[None if n is None or n in NEVER_SHARDED else rules.get(n) for n in p])
    return jax.tree.map(one, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
