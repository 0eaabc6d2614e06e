"""Group-relative advantages for GRPO: one group = the G completions sampled for one prompt.

`group_advantages(rewards [B, G], kind)`:
- `grpo` (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300; TRL `scale_rewards="group"`):
  A_i = (r_i - mean_g) / (std_g + eps), std_g the SAMPLE standard deviation (ddof = 1, unbiased), as TRL's
  `rewards.view(-1, G).std(dim=1)` (torch's default) and the MMKD-RL-Grounding seed; eps = 1e-4 as the seed.
- `drgrpo` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783; TRL
  `scale_rewards="none"`): A_i = r_i - mean_g, no division by the std.
- `rloo` (REINFORCE leave-one-out, Ahmadian et al. 2024, arXiv:2402.14740): A_i = r_i - mean_{j != i} r_j
  = G / (G - 1) · (r_i - mean_g).

A group whose sample std is <= `zero_std_tol` (all its rewards numerically equal: nothing to learn from it) gets
advantages exactly 0 under every kind, and counts in `frac_reward_zero_std` (the fraction of such groups; TRL's
metric of the same name). A group of one completion (G = 1) has no relative signal: advantages 0, counted.

Pure and jittable: numpy in -> numpy out (float64, `frac` a Python float); jax in (arrays or tracers) -> jax out
(float32 unless x64, `frac` a 0-d array).
"""

from __future__ import annotations

import numpy as np

from coordexp_jax.coord.codec import _xp

KINDS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards, kind: str = "grpo", eps: float = 1e-4, zero_std_tol: float = 1e-6):
    """`rewards [B, G]` (B prompts, G completions each) -> `(advantages [B, G], frac_reward_zero_std)`.

    Raises ValueError for an unknown `kind` or rewards that are not 2-D.
    """
    if kind not in KINDS:
        raise ValueError(f"advantage kind must be one of {KINDS}, got {kind!r}")
    xp = _xp(rewards)
    r = xp.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [B, G] (prompts x completions), got shape {tuple(r.shape)}")
    r = r.astype(xp.promote_types(r.dtype, xp.float32))
    g = r.shape[1]
    if g < 2:
        adv = xp.zeros_like(r)
        frac = xp.asarray(1.0 if r.shape[0] else 0.0, r.dtype)
        return adv, (float(frac) if xp is np else frac)
    mean = xp.mean(r, axis=1, keepdims=True)
    std = xp.std(r, axis=1, keepdims=True, ddof=1)  # sample std, as torch.Tensor.std (TRL)
    centred = r - mean
    if kind == "grpo":
        adv = centred / (std + eps)
    elif kind == "drgrpo":
        adv = centred
    else:  # rloo: r_i - (sum - r_i) / (G - 1)
        adv = centred * (g / (g - 1))
    zero = std <= zero_std_tol  # [B, 1]
    adv = xp.where(zero, xp.zeros_like(adv), adv)
    frac = xp.mean(zero.astype(r.dtype)) if r.shape[0] else xp.asarray(0.0, r.dtype)
    return adv, (float(frac) if xp is np else frac)
