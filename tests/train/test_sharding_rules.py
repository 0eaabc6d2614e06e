"""Every large parameter of the released presets is sharded by the default logical rules on fsdp-only and
tensor-only meshes (the merger and DeepStack merger `linear_fc1` kernels were not), and a parameter over 16 MiB left
replicated on a model-parallel mesh is named in a start-up warning."""

import logging
import math
import types

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from coordexp_jax.model.config import ModelConfig
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.train import config as C, sharding as shd


class _Mesh:
    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}
        self.size = math.prod(self.shape.values())

    def __repr__(self):  # the test id: the same in every xdist worker (the default repr holds an address)
        return "x".join(f"{k}{v}" for k, v in self.shape.items() if v > 1) or "one_device"


@pytest.fixture(scope="module")
def preset_params():
    out = {}
    for name in ("2b", "8b"):
        st = nnx.state(nnx.eval_shape(lambda: Qwen3VL(ModelConfig.preset(name))), nnx.Param)
        out[name] = [(k, v.shape, s) for (k, v), s in zip(
            nnx.to_flat_state(st), nnx.to_flat_state(nnx.get_partition_spec(st)).leaves)]
    return out


@pytest.mark.parametrize("mesh", [_Mesh(fsdp=8), _Mesh(tensor=8), _Mesh(fsdp=4, tensor=2)], ids=str)
@pytest.mark.parametrize("preset", ["2b", "8b"])
def test_every_large_parameter_is_sharded(preset_params, preset, mesh):
    whole = []
    for path, shape, logical in preset_params[preset]:
        spec = shd.resolve_spec(logical.value if hasattr(logical, "value") else logical, shape, mesh,
                                C.DEFAULT_RULES, str(path))
        if np.prod(shape) * 4 > 16 * 2**20 and all(a is None for a in spec):
            whole.append("/".join(map(str, path)))
    assert whole == [], (mesh.shape, whole)


def test_warning_names_large_replicated_parameters(caplog):
    arr = lambda *s: types.SimpleNamespace(shape=s, dtype=np.float32)  # noqa: E731
    sh = lambda *spec: types.SimpleNamespace(spec=P(*spec))  # noqa: E731
    named = [("big", arr(4096, 4096)), ("small", arr(1024, 1024)), ("big_sharded", arr(4096, 4096)),
             ("just_over", arr(16 * 2**20 // 4 + 1))]
    shs = [sh(None, None), sh(None, None), sh("fsdp", None), sh(None)]
    with caplog.at_level(logging.WARNING, logger=shd.__name__):
        names = shd.warn_replicated(named, shs, _Mesh(fsdp=8))
    assert names == ["big", "just_over"]  # 64 MiB and 16 MiB + 4 bytes; not 4 MiB, not the sharded one
    assert "'big' (4096, 4096) (64 MiB) is replicated on all 8 devices" in caplog.text
    # one device or pure data parallelism: replication is the intent, no warning
    assert shd.warn_replicated(named, shs, _Mesh()) == []
    assert shd.warn_replicated(named, shs, _Mesh(data=8)) == []
