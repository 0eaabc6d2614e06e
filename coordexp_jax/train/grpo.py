"""The GRPO objective as pure functions on arrays: the clipped token-level policy-gradient loss with a k3 KL
penalty (`grpo_loss`), and per-token log-probabilities of sampled completions from hidden states, computed in
sequence chunks so that `[B, T, V]` logits never exist (`token_logprobs`).

Definitions follow TRL's `GRPOTrainer` (docs: https://huggingface.co/docs/trl/main/grpo_trainer, "Computing the
loss", "Loss Types", "Logged metrics") and DeepSeekMath (Shao et al. 2024, arXiv:2402.03300), the paper that
introduced GRPO; `coordexp_method.md` §8 fixes ε = 0.2, β = 0.04. See `docs/rl.md`.

Per completion token t of completion i, with ρ = exp(logp - old_logp) and A_i its advantage:
    pg_{i,t} = -min(ρ A_i, clip(ρ, 1 - ε, 1 + ε_high) A_i)                 (PPO-clip; ε_high = ε unless given,
                                                                           DAPO's "clip-higher" when larger)
    kl_{i,t} = exp(ref - logp) - (ref - logp) - 1                           (k3 estimator of KL(π_θ || π_ref),
                                                                           Schulman 2020, unbiased, >= 0)
    l_{i,t} = pg_{i,t} + β kl_{i,t}
aggregated over completion tokens (mask = 1) by `aggregation`:
    "token_mean"           Σ_{i,t} l / Σ_{i,t} mask               TRL loss_type "dapo" / "bnpo" (DAPO's token-level
                                                                   normalisation; no length bias across a batch)
    "seq_mean_token_mean"  mean_i (Σ_t l_{i,t} / |o_i|)           TRL loss_type "grpo" (the DeepSeekMath form);
                                                                   rows without completion tokens are left out of
                                                                   the mean (TRL averages over every row; equal
                                                                   when each row has a completion token)
    "drgrpo"               Σ_{i,t} l / (N · L)                    TRL loss_type "dr_grpo" (Dr. GRPO, Liu et al.
                                                                   2025, arXiv:2503.20783); L = `max_completion_length`
                                                                   (default: T, the mask width)
`old_logp` and `ref_logp` are constants (stop_gradient). Positions outside the mask may hold anything (padding,
-inf, NaN): they are replaced before any arithmetic, so neither the loss nor its gradient sees them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from coordexp_jax.coord.losses import maybe_constrain, vocab_parallel_specs

F32 = jnp.float32
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "drgrpo")


def _up(x):
    """At least float32 (bf16 -> f32; f64 stays f64 under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, F32))


def _aggregate(x, m, aggregation: str, max_completion_length: int | None):
    """(value, denominator) of `x [N, T]` over mask `m [N, T]` (float 0/1); value = numerator / denominator."""
    if aggregation == "token_mean":
        den = jnp.maximum(jnp.sum(m), 1.0)
        return jnp.sum(x * m) / den, den
    if aggregation == "seq_mean_token_mean":
        cnt = jnp.sum(m, axis=1)
        row = jnp.sum(x * m, axis=1) / jnp.maximum(cnt, 1.0)
        den = jnp.maximum(jnp.sum((cnt > 0).astype(x.dtype)), 1.0)
        return jnp.sum(row) / den, den
    length = x.shape[1] if max_completion_length is None else max_completion_length
    den = jnp.asarray(float(x.shape[0] * length), x.dtype)
    return jnp.sum(x * m) / den, den


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float | None = None,
              beta: float = 0.04, aggregation: str = "token_mean", max_completion_length: int | None = None):
    """GRPO loss (module docstring) -> `(loss, metrics)`.

    logp `[N, T]`: log π_θ of the sampled tokens (differentiated); old_logp `[N, T]`: log π_old at sampling time
    (pass `logp` itself when there is one update per rollout: ρ = 1, the gradient is the policy gradient);
    ref_logp `[N, T]` or None: log π_ref (None only with β = 0); advantages `[N]` (one per completion) or `[N, T]`;
    mask `[N, T]` (1/True on completion tokens). Hyper-parameters are static under `jit`.

    metrics (float32 scalars): `kl` (mean k3 over completion tokens; 0 without `ref_logp`), `clip_fraction_low`
    (ρ < 1 - ε with A < 0: the clip is active), `clip_fraction_high` (ρ > 1 + ε_high with A > 0),
    `clip_fraction` (either; TRL's clip_ratio/low_mean, high_mean, region_mean), `ratio_mean`, `ratio_min`,
    `ratio_max` (over completion tokens), `pg_loss` (the aggregated clipped term), `num_tokens`, and
    `loss_denominator` (loss · loss_denominator is the un-normalised sum, for summing over micro-batches).

    Raises ValueError for an unknown aggregation, ref_logp None with β != 0, or mismatched shapes.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if ref_logp is None and beta != 0:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logp (the reference model's log-probs); pass beta=0 "
                         "to train without the KL penalty")
    logp = _up(logp)
    if logp.ndim != 2 or jnp.shape(mask) != logp.shape or jnp.shape(old_logp) != logp.shape:
        raise ValueError(f"grpo_loss: logp, old_logp and mask must all be [N, T]; got {logp.shape}, "
                         f"{jnp.shape(old_logp)}, {jnp.shape(mask)}")
    m = (jnp.asarray(mask) > 0).astype(logp.dtype)
    on = m > 0
    adv = _up(advantages)
    adv = adv[:, None] if adv.ndim == 1 else adv
    adv = jnp.where(on, jnp.broadcast_to(adv, logp.shape), 0.0)
    lp = jnp.where(on, logp, 0.0)
    old = jax.lax.stop_gradient(jnp.where(on, _up(old_logp), 0.0))
    eps_hi = epsilon if epsilon_high is None else epsilon_high

    ratio = jnp.exp(lp - old)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_hi)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    if ref_logp is not None:
        ref = jax.lax.stop_gradient(jnp.where(on, _up(ref_logp), 0.0))
        d = ref - lp
        kl = jnp.exp(d) - d - 1.0
    else:
        kl = jnp.zeros_like(lp)
    per_token = pg + beta * kl if beta != 0 else pg
    loss, den = _aggregate(per_token, m, aggregation, max_completion_length)

    n_tok = jnp.sum(m)
    tok_mean = lambda x: jnp.sum(jnp.where(on, x, 0.0)) / jnp.maximum(n_tok, 1.0)  # noqa: E731
    low = (ratio < 1.0 - epsilon) & (adv < 0)
    high = (ratio > 1.0 + eps_hi) & (adv > 0)
    sg = jax.lax.stop_gradient
    metrics = {
        "kl": sg(tok_mean(kl)),
        "clip_fraction_low": tok_mean(low.astype(lp.dtype)),
        "clip_fraction_high": tok_mean(high.astype(lp.dtype)),
        "clip_fraction": tok_mean((low | high).astype(lp.dtype)),
        "ratio_mean": sg(tok_mean(ratio)),
        "ratio_min": sg(jnp.min(jnp.where(on, ratio, jnp.inf))),
        "ratio_max": sg(jnp.max(jnp.where(on, ratio, -jnp.inf))),
        "pg_loss": sg(_aggregate(pg, m, aggregation, max_completion_length)[0]),
        "num_tokens": n_tok,
        "loss_denominator": den,
    }
    return loss, {k: v.astype(F32) for k, v in metrics.items()}


def token_logprobs(hidden, head_weight, targets, chunk: int = 256, *, vocab_size: int | None = None,
                   temperature: float = 1.0, return_entropy: bool = False, dtype=None):
    """log softmax(h W^T / temperature)[target] per position, without materialising `[B, T, V]`.

    hidden `[B, T, H]` (the model's final-norm output at the positions that PREDICT the targets, i.e. shifted by
    one from the target ids), head_weight `[V, H]` (`train.objective.output_embedding(model)`: the tied embedding
    or lm_head's kernel transposed; V may include vocabulary padding), targets `[B, T]` int (clipped into range;
    mask invalid positions afterwards). Returns logp `[B, T]` float32 (float64 under x64 with f64 inputs), and with
    `return_entropy` also the entropy of the full softmax `[B, T]` (nats). Ids >= `vocab_size` are excluded from the
    softmax. `dtype`: the matmul's operand dtype (the model's compute dtype, as `Qwen3VL.lm_logits`), cast inside
    each chunk; the product accumulates in float32.

    The same machinery as `coord.losses.chunked_vocab_stats`: T is padded to a multiple of `chunk`, a `lax.scan`
    runs over the chunks, its body under `jax.checkpoint` (rematerialised in the backward pass), logits accumulated
    in float32, the target logit read as a masked sum (its gradient is a select, not a scatter). Differentiable
    with respect to hidden and head_weight. Vocabulary-parallel under a mesh, as `chunked_vocab_stats` (the weight
    and its gradient never whole on a device). Raises ValueError when `chunk < 1` or shapes disagree.
    """
    if chunk < 1:
        raise ValueError(f"token_logprobs: chunk must be >= 1, got {chunk}")
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or head_weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"token_logprobs: need hidden [B, T, H], targets [B, T], head_weight [V, H]; got "
                         f"{hidden.shape}, {targets.shape}, {head_weight.shape}")
    b, s, h = hidden.shape
    v = head_weight.shape[0]
    c = min(chunk, s)
    n = -(-s // c)
    pad = n * c - s
    hid = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, h).swapaxes(0, 1)  # [n, B, C, H]
    tgt = jnp.pad(jnp.clip(targets, 0, v - 1).astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
    ids = jnp.arange(v, dtype=jnp.int32)
    valid = ids < (v if vocab_size is None else vocab_size)
    acc = jnp.promote_types(hidden.dtype if dtype is None else jnp.dtype(dtype), F32)
    sp = vocab_parallel_specs(b, v) or {}
    weight = maybe_constrain(head_weight, sp.get("weight"))

    @jax.checkpoint
    def body(hc, tc):
        w = maybe_constrain(weight, sp.get("weight"))
        hc = maybe_constrain(maybe_constrain(hc, sp.get("own")), sp.get("rows"))
        if dtype is not None:  # cast inside the chunk: the weight's gradient accumulates in its own dtype
            hc, w = hc.astype(dtype), w.astype(dtype)
        z = maybe_constrain(jnp.einsum("bch,vh->bcv", hc, w, preferred_element_type=acc), sp.get("logits"))
        tc = maybe_constrain(tc, sp.get("stats"))
        if temperature != 1.0:
            z = z / temperature
        z = jnp.where(valid, z, -jnp.inf)
        lse = jax.nn.logsumexp(z, axis=-1)
        zt = jnp.sum(jnp.where(ids == tc[..., None], z, 0.0), axis=-1)
        out = {"logp": zt - lse}
        if return_entropy:
            lp = jnp.where(valid, z - lse[..., None], 0.0)
            out["entropy"] = -jnp.sum(jnp.exp(lp) * jnp.where(valid, lp, 0.0), axis=-1)
        return {k: maybe_constrain(x, sp.get("stats")) for k, x in out.items()}

    _, out = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, (hid, tgt))
    out = {k: x.swapaxes(0, 1).reshape(b, n * c)[:, :s] for k, x in out.items()}
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]
