"""The sharded train step on 8 simulated CPU devices (data=2, fsdp=2, tensor=2) equals the 1-device step (stand-in
with 2 micro-batches and EMA; the tiny Qwen3-VL with images and every Stage-1 term), two processes agree with one, and mesh
construction / spec resolution rules."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from coordexp_jax.train import config as C, sharding as shd

HERE = os.path.dirname(os.path.abspath(__file__))


def _subprocess_env(n):
    env = dict(os.environ)
    # keep the caller's XLA flags (e.g. --xla_cpu_max_isa) so the subprocesses run the same code path
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), env.get("PYTHONPATH", "")])
    return env


def test_sharded_step_equals_single_device():
    r = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_check.py")], env=_subprocess_env(8),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    res2 = res["accum2"]
    # the sharded step sums the same float32 terms in another order (per-device partial sums, all-reduce): losses
    # within ~1e-7 relative, each state leaf (params, Adam moments, EMA) within ~2e-6 of its largest entry (the
    # squared moment doubles the gradients' relative error); seen 1.2e-7 / 1.7e-6
    np.testing.assert_allclose(res2["loss8"], res2["loss1"], rtol=2e-6)
    assert res2["state_rel_diff"] < 2e-5, res2
    specs = res["specs"]
    # the parameters really are sharded over every mesh axis
    assert specs["['embed_tokens']['embedding'].value"] == str(P("tensor", "fsdp"))
    assert specs["['layers'][0]['up_proj']['kernel'].value"] == str(P("fsdp", "tensor"))


def test_mesh_shape_rest_and_errors():
    assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert shd.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 4) == (1, 4, 1)
    with pytest.raises(ValueError, match="need 8 devices but 4"):
        shd.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 4)
    with pytest.raises(ValueError, match="at most one"):
        shd.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 4)


class _FakeMesh:
    shape = {"data": 2, "fsdp": 2, "tensor": 2}


def test_resolve_spec_rules():
    rules = C.DEFAULT_RULES
    m = _FakeMesh()
    assert shd.resolve_spec(P("vocab", "embed"), (1024, 64), m, rules) == P("tensor", "fsdp")
    # a non-divisible dimension is replicated, not silently mis-sharded
    assert shd.resolve_spec(P("vocab", "embed"), (1645, 64), m, rules) == P(None, "fsdp")
    # one mesh axis at most once per array
    assert shd.resolve_spec(P("q_heads", "mlp"), (8, 8), m, rules) == P("tensor", None)
    assert shd.resolve_spec(P("batch", None), (8, 3), m, rules) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'nope' of 'w' has no rule"):
        shd.resolve_spec(P("nope"), (4,), m, rules, "w")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_agree_with_one(tmp_path):
    script = os.path.join(HERE, "_multiproc_check.py")
    ref = subprocess.run([sys.executable, script, str(tmp_path / "one")], env=_subprocess_env(1), capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    one = json.loads(ref.stdout.split("RESULT ", 1)[1])
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _subprocess_env(1)
        env.update(COORDEXP_COORDINATOR=f"127.0.0.1:{port}", COORDEXP_NUM_PROCESSES="2", COORDEXP_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, script, str(tmp_path / "two")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    two = json.loads(outs[0][0].split("RESULT ", 1)[1])
    assert (one["processes"], two["processes"], two["devices"]) == (1, 2, 2)
    assert len(two["losses"]) == 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)  # float32 losses, other summation order


def test_real_model_sharded_step_equals_single_device(tmp_path):
    """The tiny Qwen3-VL with images, every Stage-1 term and 2 micro-batches: (2,2,2) mesh == 1 device."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_check.py"), str(tmp_path / "syn")],
                       env=_subprocess_env(8), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    for m1, m8 in zip(res["loss1"], res["loss8"]):
        assert m1["count/l1"] > 0 and m1["count/gate"] > 0
        for k in m1:
            # float32 sums/counts in another order: relative; atol 1e-7 only for metrics that are 0
            np.testing.assert_allclose(m8[k], m1[k], rtol=5e-6, atol=1e-7, err_msg=k)
    assert res["state_rel_diff"] < 2e-5, res["state_rel_diff"]  # each leaf vs its largest entry, as above (seen 7e-7)
    specs = res["specs"]
    emb = [v for k, v in specs.items() if "embed_tokens" in k][0]
    assert emb == str(P("tensor", "fsdp")), specs
    assert any("'tensor'" in v for k, v in specs.items() if "visual" in k)
