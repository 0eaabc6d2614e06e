"""Regression heads and CoordExp point tokens trained together (`counting.point_tokens`): configs/counting_demo.py
(the same synthetic counting set, starting model, steps and schedule) where every batch also holds, for each of its
images, the point-token row of configs/counting_points_demo.py (CoordExp's `counting` task on the unmarked image:
`{"count": N, "points": [[<x>, <y>], ...]}` in coordinate tokens) with that config's objective (CE + soft CE + W1 +
gate). One forward per step over the 2 x batch rows; the loss is the heads' `x` + `y` plus the Stage-1 terms. The
"both" side of benchmarks/counting_heads_vs_points.py, which scores the two read-outs of this one model.

    python -m coordexp_jax.train --config configs/counting_both_demo.py --workdir runs/counting_both
"""

import os

from coordexp_jax.train.config import load_config_file


def get_config():
    here = os.path.dirname(os.path.abspath(__file__))
    c = load_config_file(os.path.join(here, "counting_demo.py"))
    p = load_config_file(os.path.join(here, "counting_points_demo.py"))
    c.name = "counting_both_demo"
    c.counting.point_tokens = True
    c.data.protocol = p.data.protocol
    c.data.seq_len = p.data.seq_len  # the point-token answers need 256 tokens; the counting rows share the length
    for k in ("ce", "soft_ce", "w1", "gate", "coord_positions"):
        c.loss[k] = p.loss[k]
    return c
