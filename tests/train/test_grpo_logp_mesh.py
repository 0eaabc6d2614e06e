"""The GRPO old/reference log-prob forward (`grpo_loop.make_logp_fn`) on 8 simulated CPU devices, traced under the
train step's mesh as `build_parts` does: equal to the single-device forward, and vocabulary-parallel (no device
holds the whole `[V, H]` output embedding or whole-vocabulary logits)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _simulated_devices import run_check  # noqa: E402


def test_logp_forward_under_the_mesh_is_vocab_parallel_and_equal():
    res = run_check(os.path.join(HERE, "_grpo_logp_mesh_check.py"))
    for shape, m in res["meshes"].items():
        # float32 log-probs (~-7) from log-sum-exps reduced in another order (per device, then across): ~1e-7
        # relative; 1e-5 of the largest leaves a wide margin
        assert m["max_abs_diff"] <= 1e-5 * m["scale"], (shape, m)
        assert m["whole_weight_arrays"] == [], (shape, m["whole_weight_arrays"])
        assert m["whole_vocab_logits"] == [], (shape, m["whole_vocab_logits"])
    # the same sharded call traced without the mesh: every device computes every row's whole-vocabulary logits
    assert res["meshes"]["(1, 8, 1)"]["whole_vocab_logits_without_mesh"]
