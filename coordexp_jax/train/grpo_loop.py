"""GRPO training (`train.kind = 'grpo'`): rollouts of the current weights, rewards, group advantages, PPO-clip updates.

`python -m coordexp_jax.train --config configs/grpo_demo.py --config.model.checkpoint=DIR` runs `train_grpo` (the
loop of `train/loop.py` hands a GRPO config over). One step consumes one rollout batch:

1. `train.grad_accum` micro-batches of B prompts from the data pipeline (ordinary training batches: the prompt of
   each row is rolled out, its answer tokens and box slots give the ground truth, as in Stage-2);
2. every prompt repeated G = `grpo.num_generations` times (rows b*G .. b*G+G-1; the image slots are shared, so the
   vision tower runs once per image) and sampled by the jitted sampler (`rollout/sampler.py`, compiled once; the
   weights are swapped in) at `grpo.temperature`, `grpo.top_k`, `grpo.top_p`, with the key
   fold_in(key(train.seed), step): a resumed run draws the rollouts an uninterrupted one would;
3. each completion parsed under the protocol, rewarded (`rl/rewards.py`, `grpo.rewards` weights) and given its
   group advantage (`rl/advantages.py`, `grpo.advantage`) among the G samples of its prompt;
4. a teacher-forced batch prompt + completion (left-padded prompt bucket L, completion bucket T = the next power of
   two >= the longest completion, at most the rollout length), whose per-token log-probs come from the chunked head
   (`train/grpo.py:token_logprobs`, never `[B, T, V]` logits) at the sampling temperature;
5. `grpo.mu` optimizer updates of the GRPO objective (`train/grpo.py:grpo_loss`) through the Stage-1 train step
   (`step.make_train_step`: optimizer groups, LoRA, coordinate rows, clipping, non-finite skip, shardings). With
   mu = 1 the old log-probs are the current ones without gradient (ratio 1); with mu > 1 they are recorded by a
   no-gradient forward before the first update. With `grpo.beta > 0` the reference log-probs come from the same
   forward on the reference weights: the starting weights. A copy is kept only of what training can change: with
   LoRA the adapters are switched off (lora_b = 0) and only the coordinate rows of the embedding (trainable through
   `optim.coord_rows`) are kept at their starting values - no second copy of the model.

`train.steps` counts rollout batches; the learning-rate schedule runs over `train.steps * grpo.mu` updates and the
TrainState's `step` counts updates. Checkpoints (orbax, with the data iterator) are written at rollout-batch
boundaries and a restarted run resumes there. Several processes (`jax.distributed`): each holds its share of the
prompts (whole groups of G rows, so rewards and advantages stay on the process that holds the prompt); the rollout
is one SPMD program over the global batch (`rollout/multihost.py:generate_global`), the update batch global arrays
(`loop._put_global`), the logged metrics those of all processes' rows; only process 0 writes them. The built-in
reward evaluation still runs in one process only (`_check_processes`).

Logged per step (progress bar, TensorBoard, `metrics.jsonl` kind 'train'): `reward`, `reward_std`,
`rewards/<name>/mean|std`, `frac_reward_zero_std`, `kl`, `clip_fraction` (low/high), `ratio_mean`, `pg_loss`,
`entropy` (exact, of the policy over completion tokens), `completion_length`,
`truncated_rate`, `parse_rate`, `loss`, `grad_norm`, `lr`, and the seconds of `rollout_s`, `reward_s`, `update_s`.
Evaluation (`eval.every`, `eval.at_end`): greedy rollouts of the held-out records scored by `score_records`
(mean reward, parse rate, Acc@0.5).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordexp_jax.coord import protocols
from coordexp_jax.errors import CoordExpError
from coordexp_jax.rollout.sampler import VISION_KEYS, Rollout, bucket_inputs, next_pow2
from coordexp_jax.train import metrics_log, optim
from coordexp_jax.train.objective import output_embedding, vision_inputs

log = logging.getLogger(__name__)

MIN_COMPLETION_BUCKET = 8  # the smallest completion bucket T (power of two)
MIN_PROMPT_BUCKET = 16  # the smallest prompt bucket L (the sampler's default)


class GRPOError(CoordExpError, ValueError):
    """A GRPO run that cannot start as configured: no reward to optimise, or on several processes a global batch
    the data-parallel size does not divide or the built-in reward evaluation switched on (it runs in one process)."""


# ------------------------------------------------------------------------------------------ host-side batches
def repeat_prompts(prompts: Mapping[str, np.ndarray], G: int) -> dict:
    """A left-padded prompt batch `[B, L]` (rollout contract of `rollout/sampler.py`) -> `[B*G, L]`: row b*G+g is a
    copy of row b. The image slots (`pixel_values [I, P, F]` and the other vision arrays) are NOT repeated: every
    copy's `visual_index` points at its prompt's slot, so the vision tower runs once per image."""
    out = {}
    for k, v in prompts.items():
        v = np.asarray(v)
        if k in VISION_KEYS:
            out[k] = v
        elif k == "positions":  # [3, B, L]
            out[k] = np.repeat(v, G, axis=1)
        else:
            out[k] = np.repeat(v, G, axis=0)
    return out


def completion_batch(prompts: Mapping[str, np.ndarray], tokens: np.ndarray, lengths: np.ndarray,
                     pad_id: int) -> dict:
    """Teacher-forced rows prompt + completion for the log-prob forward.

    Args:
      prompts: left-padded prompt batch `[N, L]` (`input_ids`, `attention_mask`, `positions [3, N, L]`,
        `rope_deltas [N]`, with images `visual_index [N, L]` and the vision slot arrays).
      tokens: `[N, T]` int completion ids (anything after a row's length is ignored); lengths: `[N]` emitted tokens
        including the stop token.
    Returns:
      model inputs `[N, L+T]` (`input_ids`, `attention_mask`, `positions [3, N, L+T]`, `visual_index`, the vision
      arrays unchanged), `completion [N, T]` (pad id after the stop) and `completion_mask [N, T]` float32 (1 on the
      emitted tokens, the stop token included). Completion token k sits at column L + k with rope position
      n_valid + k + rope_delta on all three M-RoPE axes (how the sampler fed it, qwen3vl_spec.md §7); the hidden
      state at column L - 1 + k predicts it.
    """
    ids_p = np.asarray(prompts["input_ids"])
    N, L = ids_p.shape
    tokens = np.asarray(tokens)
    T = tokens.shape[1]
    lengths = np.asarray(lengths).reshape(N)
    if tokens.shape[0] != N:
        raise ValueError(f"completion tokens have {tokens.shape[0]} rows for {N} prompts")
    cmask = np.arange(T)[None, :] < lengths[:, None]
    comp = np.where(cmask, tokens, pad_id).astype(np.int32)
    am_p = np.asarray(prompts["attention_mask"])
    n_valid = am_p.sum(-1).astype(np.int32)
    delta = np.asarray(prompts.get("rope_deltas", np.zeros(N, np.int32))).reshape(N).astype(np.int32)
    cpos = np.where(cmask, n_valid[:, None] + np.arange(T)[None, :] + delta[:, None], 0).astype(np.int32)
    out = {
        "input_ids": np.concatenate([ids_p.astype(np.int32), comp], 1),
        "attention_mask": np.concatenate([am_p.astype(np.int32), cmask.astype(np.int32)], 1),
        "positions": np.concatenate([np.asarray(prompts["positions"]).astype(np.int32),
                                     np.broadcast_to(cpos[None], (3, N, T))], 2),
        "completion": comp,
        "completion_mask": cmask.astype(np.float32),
    }
    if "visual_index" in prompts:
        out["visual_index"] = np.concatenate([np.asarray(prompts["visual_index"]).astype(np.int32),
                                              np.full((N, T), -1, np.int32)], 1)
        for k in VISION_KEYS:
            out[k] = np.asarray(prompts[k])
    return out


def ground_truth(batch: Mapping[str, np.ndarray], tokenizer, token_ids, protocol: str) -> list[list[tuple]]:
    """Per row of a right-padded training batch: [(desc, normalised xyxy box)] of its answer. The descs and boxes are
    parsed back from the row's answer tokens (for `qwen_text` the exact boxes as written; for coordinate-token
    protocols the bins k / 999); where the row has box slots (`box_valid`), the continuous `box_target` replaces
    the binned box (as Stage-2 does)."""
    from coordexp_jax.train.stage2 import prompt_lengths

    plen = prompt_lengths(batch)
    ids = np.asarray(batch["input_ids"])
    n_tok = np.asarray(batch["attention_mask"]).sum(-1)
    valid = np.asarray(batch["box_valid"]) if "box_valid" in batch else None
    out = []
    for b in range(len(plen)):
        parsed = protocols.parse(list(ids[b, plen[b]:n_tok[b]]), tokenizer, token_ids, protocol)
        boxes = np.asarray([o.box for o in parsed.objects], np.float64).reshape(-1, 4)
        if valid is not None:
            m = min(int(valid[b].sum()), len(boxes))
            boxes[:m] = np.asarray(batch["box_target"])[b, :m]
        out.append([(o.desc, boxes[i]) for i, o in enumerate(parsed.objects)])
    return out


# ----------------------------------------------------------------------------------------- log-probs, reference
def completion_logprobs(model, batch: Mapping[str, jax.Array], temperature: float, chunk: int,
                        return_entropy: bool = False):
    """Per-token log-probs `[N, T]` float32 of `batch['completion']` under `model` at `temperature` (the logits of
    the sampler divided by it), from one teacher-forced forward over prompt + completion (`completion_batch`). The
    vocabulary head runs in sequence chunks of `chunk` positions (`train/grpo.py:token_logprobs`: no `[N, T, V]`
    logits); vocabulary padding is excluded. With `return_entropy`, also the entropy `[N, T]` (nats) of that
    distribution."""
    from coordexp_jax.train.grpo import token_logprobs

    hidden = model(batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch))
    T = batch["completion"].shape[1]
    L = hidden.shape[1] - T
    h = hidden[:, L - 1:L - 1 + T]  # the positions that predict completion tokens 0..T-1
    cfg = getattr(model, "config", None)
    return token_logprobs(h, output_embedding(model), batch["completion"], chunk,
                          vocab_size=getattr(cfg, "vocab_size", None), temperature=temperature,
                          return_entropy=return_entropy, dtype=getattr(model, "dtype", None))


@dataclasses.dataclass
class Reference:
    """The reference weights of the KL term as a function of the current trainable params: the starting weights.

    Only what training can change is stored (a dict path -> array, copied at construction): a full copy of every
    parameter with a non-zero learning rate, only the coordinate rows of a parameter whose other rows are frozen
    (LoRA, or a frozen 'lm' group: `optim.multipliers`), nothing for LoRA adapters (`lora_b = 0` switches them off,
    which is the starting model because B starts at zero) nor for frozen parameters.
    """

    store: dict
    rows: dict  # path -> vocabulary axis of a coordinate-row-only entry
    coord_start: int

    @classmethod
    def from_params(cls, cfg, params, vocab_size: int, coord_start: int) -> "Reference":
        from coordexp_jax.data.tokenizer import NUM_BINS

        mults = optim.multipliers(params, cfg, vocab_size, coord_start)
        flat_m = dict(_flat(mults, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3))
        store, rows = {}, {}
        for p, leaf in _flat(params):
            if p.endswith(("lora_a", "lora_b")):
                continue
            m = flat_m[p]
            if isinstance(m, tuple):
                axis, base, coord = m
                if base == 0.0 and coord == 0.0:
                    continue
                if base == 0.0:
                    store[p] = jnp.array(jax.lax.slice_in_dim(leaf, coord_start, coord_start + NUM_BINS, axis=axis),
                                         copy=True)
                    rows[p] = axis
                    continue
            elif m == 0.0:
                continue
            store[p] = jnp.array(leaf, copy=True)
        return cls(store, rows, coord_start)

    def params(self, params, store: dict | None = None):
        """The reference trainable params (pure: jit it with `store` passed as an argument)."""
        store = self.store if store is None else store

        def one(path, leaf):
            p = optim.path_str(path)
            if p.endswith("lora_b"):
                return jnp.zeros_like(leaf)
            if p not in store:
                return leaf
            if p in self.rows:
                return jax.lax.dynamic_update_slice_in_dim(leaf, store[p].astype(leaf.dtype), self.coord_start,
                                                           axis=self.rows[p])
            return store[p]

        return jax.tree_util.tree_map_with_path(one, params)


def _flat(tree, is_leaf=None):
    return [(optim.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


# ------------------------------------------------------------------------------------------------ objective
METRICS = ("kl", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "pg_loss", "entropy")


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The GRPO objective in the train step's contract (`step.Objective`): the term 'grpo' (weight 1) is
    `train/grpo.py:grpo_loss` of one micro-batch; `METRICS` (the loss's KL, clip fractions, ratio mean and
    clipped policy-gradient term, and the mean entropy of the policy over completion tokens) ride along as weight-0
    terms. Every term is averaged over the micro-batches (count = their number).

    The micro-batch holds the `completion_batch` arrays plus `advantages [N]` float32, and optionally
    `old_logp [N, T]` (mu > 1; else the current log-probs: ratio 1) and `ref_logp [N, T]` (beta > 0).
    """

    temperature: float
    chunk: int
    epsilon: float
    epsilon_high: float
    beta: float
    aggregation: str
    metric_names: tuple = METRICS

    @property
    def weights(self) -> dict:
        return {"grpo": 1.0, **{k: 0.0 for k in self.metric_names}}

    def counts(self, batch):
        n = jnp.asarray(batch["advantages"].shape[0], jnp.float32)  # the micro-batch axis
        return {k: n for k in self.weights}

    def loss(self, logp, batch):
        """`grpo_loss` of log-probs `logp [N, T]` on a micro-batch -> (loss, metrics)."""
        from coordexp_jax.train.grpo import grpo_loss

        old = batch["old_logp"] if "old_logp" in batch else logp  # grpo_loss stops its gradient
        ref = batch.get("ref_logp")
        return grpo_loss(logp, old, ref, batch["advantages"], batch["completion_mask"], epsilon=self.epsilon,
                         epsilon_high=self.epsilon_high, beta=self.beta if ref is not None else 0.0,
                         aggregation=self.aggregation)

    def sums(self, model, batch, rng=None):
        del rng
        logp, ent = completion_logprobs(model, batch, self.temperature, self.chunk, return_entropy=True)
        loss, metrics = self.loss(logp, batch)
        m = batch["completion_mask"].astype(jnp.float32)
        metrics = dict(metrics, entropy=jax.lax.stop_gradient(jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)))
        out = {"grpo": loss, **{k: metrics[k] for k in self.metric_names}}
        return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def make_logp_fn(graphdef, temperature: float, chunk: int, reference: Reference | None = None, mesh=None):
    """Jitted `(params, frozen, batch[, store]) -> [A, N, T]` completion log-probs without gradient, per
    micro-batch of a `[A, ...]` batch; with `reference`, under the reference weights (store = `reference.store`).
    With `mesh` it is traced under that mesh (`jax.sharding.use_abstract_mesh`, as the train step), so the
    vocabulary head runs vocabulary-parallel (`train/grpo.py:token_logprobs`): no device holds the whole `[V, H]`
    output embedding."""

    def per_micro(params, frozen, micro):
        model = nnx.merge(graphdef, params, frozen)
        return completion_logprobs(model, micro, temperature, chunk)

    if reference is None:
        def fn(params, frozen, batch):
            return jax.lax.map(lambda m: per_micro(params, frozen, m), batch)
    else:
        def fn(params, frozen, batch, store):
            ref = reference.params(params, store)
            return jax.lax.map(lambda m: per_micro(ref, frozen, m), batch)
    if mesh is None:
        return jax.jit(fn)

    def in_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return jax.jit(in_mesh)


# --------------------------------------------------------------------------------------------------- rollouts
class GRPORunner:
    """Rollouts, parsing, rewards and advantages of a step (host side, around the jitted sampler)."""

    def __init__(self, cfg, comps, graphdef, mesh=None):
        from coordexp_jax.data.tokenizer import load_tokenizer

        g = cfg.grpo
        self.G = int(g.num_generations)
        self.max_new_tokens = int(g.max_new_tokens) or int(cfg.eval.max_new_tokens)
        self.temperature, self.top_k, self.top_p = float(g.temperature), int(g.top_k), float(g.top_p)
        self.advantage, self.advantage_eps = g.advantage, float(g.advantage_eps)
        self.weights = {k: float(w) for k, w in g.rewards.items() if float(w) > 0}
        if not self.weights:
            raise GRPOError("config key 'grpo.rewards': every reward weight is 0")
        self.protocol = cfg.data.protocol
        self.graphdef = graphdef
        self.token_ids = comps.token_ids
        self.tokenizer = load_tokenizer(comps.tokenizer_dir)
        self.seed = int(cfg.train.seed)
        self.sampler = None
        self.mesh = mesh  # several processes: the mesh of the global rollout (`rollout/multihost.py`)
        vis = getattr(comps.model_config, "vision", None)
        self.merge = int(getattr(vis, "spatial_merge_size", 2))

    def _sampler(self, params, frozen):
        from coordexp_jax.rollout.sampler import Sampler, SamplerConfig

        graphdef, state = nnx.split(nnx.merge(self.graphdef, params, frozen))
        if self.sampler is None:
            self.sampler = Sampler((graphdef, state), self.token_ids, SamplerConfig(
                max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                top_p=self.top_p, seed=self.seed))
        self.sampler.state = state
        return self.sampler

    def generate(self, prompts: Mapping[str, np.ndarray], key) -> Rollout:
        """Samples the left-padded, repeated prompt rows `[N, L]` of this process with `key` (the same on every
        process). One process: `Sampler.generate`. Several processes: one SPMD rollout of the global batch (every
        process's rows, in process order) with the global parameters, this process's rows back
        (`rollout/multihost.py:generate_global`)."""
        if jax.process_count() > 1:
            from coordexp_jax.rollout.multihost import generate_global

            return generate_global(self.sampler, prompts, self.mesh, merge=self.merge, key=key)
        return self.sampler.generate(prompts, key=key)

    def rollout(self, micro_batches: Sequence[Mapping[str, np.ndarray]], params, frozen, step: int):
        """Rolls out every micro-batch (G samples per prompt) and builds the update's micro-batches.

        Several processes: each passes its own prompts (whole groups: the G samples of a prompt stay on the process
        that holds it, so rewards and advantages are computed where the rows live); the prompt bucket L and the
        completion bucket T are the largest over the processes (one all-gather each), so the micro-batches of all
        processes form one global batch; the metrics are those of all processes' rows (one all-gather of the per-row
        values; seconds: the slowest process's).

        Returns (list of this process's numpy micro-batches of equal shapes `[B*G, ...]`, host metrics of the step).
        """
        from coordexp_jax.rl.advantages import group_advantages
        from coordexp_jax.rl.rewards import as_answer, compute_rewards
        from coordexp_jax.rollout.multihost import allgather_columns, allgather_ints
        from coordexp_jax.train import stage2

        ids, G = self.token_ids, self.G
        t0 = time.perf_counter()
        self._sampler(params, frozen)
        prompts = [stage2.left_padded_prompts(b, ids.pad) for b in micro_batches]
        Lb = max(MIN_PROMPT_BUCKET, next_pow2(max(p["input_ids"].shape[1] for p in prompts)))
        Lb = int(allgather_ints([Lb]).max())  # the bucket of every process (one process: unchanged)
        reps, rollouts = [], []
        for a, p in enumerate(prompts):
            rep, _ = bucket_inputs(repeat_prompts(p, G), pad_id=ids.pad, min_prompt_len=Lb, bucket_batch=False)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), step), a)
            reps.append(rep)
            rollouts.append(self.generate(rep, key))
        t1 = time.perf_counter()
        longest = int(allgather_ints([max(int(r.lengths.max()) for r in rollouts)]).max())
        T = min(self.max_new_tokens, max(MIN_COMPLETION_BUCKET, next_pow2(longest)))
        out, rewards, per_fn, zero_std, parsed_ok, lengths, finished = [], [], {}, [], [], [], []
        for b, rep, ro in zip(micro_batches, reps, rollouts):
            gts = ground_truth(b, self.tokenizer, ids, self.protocol)
            B = len(gts)
            parsed = [protocols.parse(ro.row(i), self.tokenizer, ids, self.protocol) for i in range(B * G)]
            total, per = compute_rewards(parsed, [gts[i // G] for i in range(B * G)], self.weights)
            adv, frac = group_advantages(total.reshape(B, G), self.advantage, self.advantage_eps)
            mb = completion_batch(rep, ro.tokens[:, :T], ro.lengths, ids.pad)
            mb["advantages"] = np.asarray(adv, np.float32).reshape(B * G)
            out.append(mb)
            rewards.append(total)
            for k, v in per.items():
                per_fn.setdefault(k, []).append(v)
            zero_std.append(float(frac))
            parsed_ok += [as_answer(p).ok for p in parsed]
            lengths.append(ro.lengths)
            finished.append(ro.finished)
        cols = {"reward": np.concatenate(rewards), "parsed": np.asarray(parsed_ok, np.float64),
                "length": np.concatenate(lengths), "finished": np.concatenate(finished), "zero_std": zero_std,
                **{f"rewards/{k}": np.concatenate(v) for k, v in per_fn.items()},
                "rollout_s": [t1 - t0], "reward_s": [time.perf_counter() - t1]}
        if jax.process_count() > 1:  # every process's rows (equal counts: the means are those of the global batch)
            cols = allgather_columns(cols)
        r = np.asarray(cols["reward"])
        m = {"reward": float(r.mean()), "reward_std": float(r.std()),
             "frac_reward_zero_std": float(np.mean(cols["zero_std"])), "parse_rate": float(np.mean(cols["parsed"])),
             "completion_length": float(np.mean(cols["length"])),
             "truncated_rate": float(1.0 - np.mean(cols["finished"])), "completion_bucket": float(T)}
        for k in per_fn:
            v = np.asarray(cols[f"rewards/{k}"])
            m[f"rewards/{k}/mean"], m[f"rewards/{k}/std"] = float(v.mean()), float(v.std())
        m["rollout_s"], m["reward_s"] = float(np.max(cols["rollout_s"])), float(np.max(cols["reward_s"]))
        return out, m


# ------------------------------------------------------------------------------------------------ evaluation
def score_records(sampler, records: Sequence, encoder, *, model_config, weights: Mapping[str, float],
                  batch_size: int = 16) -> dict:
    """Greedy (the sampler's settings) rollouts of `records` scored for GRPO: `reward` (the weighted sum of
    `weights`, mean over records), `rewards/<name>` (each reward's mean), `parse_rate` (answers that parse under
    the protocol: closed, nothing dropped), `acc@0.5` (grounding accuracy, IoU >= 0.5 of the first parsed box, over
    the records with exactly one ground-truth box; a missing box is a miss) and `num_records`."""
    from coordexp_jax import metrics as M
    from coordexp_jax.data.prompts import encode_prompts
    from coordexp_jax.rl.rewards import as_answer, compute_rewards

    tok, ids, protocol = encoder.tokenizer, encoder.token_ids, encoder.cfg.protocol
    preds, gts = [], []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        batch = encode_prompts(chunk, encoder, model_config=model_config)
        batch.pop("prompt_lengths", None)
        ro = sampler.generate(batch)
        for b, r in enumerate(chunk):
            preds.append(protocols.parse(ro.row(b), tok, ids, protocol))
            gts.append([(o.desc, o.box) for o in r.objects])
    total, per = compute_rewards(preds, gts, weights)
    single = [i for i, g in enumerate(gts) if len(g) == 1]
    out = {"reward": float(total.mean()), "parse_rate": float(np.mean([as_answer(p).ok for p in preds])),
           "num_records": float(len(preds))}
    out.update({f"rewards/{k}": float(v.mean()) for k, v in per.items()})
    if single:
        first = [tuple(preds[i].objects[0].box) if preds[i].objects else None for i in single]
        out["acc@0.5"] = M.grounding_accuracy(first, [gts[i][0][1] for i in single])
    return out


def reward_eval_hook(cfg, comps, t_start: float | None = None):
    """A loop eval hook `(model, step, workdir) -> metrics` scoring up to `eval.num_images` held-out records with
    `score_records` (greedy rollouts of `eval.max_new_tokens`, the run's reward weights); None without eval data."""
    if not comps.extra.get("eval_specs") or cfg.eval.num_images == 0 or comps.token_ids is None:
        return None
    from coordexp_jax.evaluate import eval_setup, make_sampler

    records, encoder, _ = eval_setup(cfg, comps.model_config)
    weights = {k: float(w) for k, w in cfg.grpo.rewards.items() if float(w) > 0}
    box: dict = {}
    t0 = time.time() if t_start is None else t_start

    def hook(model, step, workdir):
        graphdef, state = nnx.split(model)
        if "sampler" not in box:
            box["sampler"] = make_sampler((graphdef, state), comps.token_ids, cfg)
        box["sampler"].state = state
        res = score_records(box["sampler"], records, encoder, model_config=comps.model_config, weights=weights,
                            batch_size=cfg.eval.batch_size)
        res["minutes"] = (time.time() - t0) / 60
        return res

    return hook


# ------------------------------------------------------------------------------------------------------ loop
@dataclasses.dataclass
class GRPOParts:
    """The pieces of a GRPO run (`build_parts`), shared by `train_grpo`, the tests and benchmarks/bench_grpo.py.

    state: the TrainState (its `step` counts updates); step_fn: the jitted train step of `objective` (state donated);
    old_fn / ref_fn: the jitted no-gradient log-prob forwards of the current / reference weights (None when mu = 1 /
    beta = 0); reference: what the reference keeps of the starting weights; runner: rollouts and rewards.
    """

    graphdef: Any
    state: Any
    shardings: Any
    objective: GRPOObjective
    step_fn: Any
    old_fn: Any
    ref_fn: Any
    reference: Reference | None
    runner: GRPORunner
    mesh: Any
    mu: int
    trainable_names: list

    def to_device(self, micro_batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
        """This process's numpy micro-batches of equal shapes -> one `[A, ...]` batch of global arrays in the batch
        shardings (several processes: every process's rows side by side, `visual_index` shifted past the image slots
        of the processes in front, as the SFT loop's batches: `loop._put_global`)."""
        from coordexp_jax.train import loop as loop_lib

        return loop_lib._put_global(loop_lib._stack(list(micro_batches)), self.mesh, self.runner.merge)

    def update(self, state, batch: dict) -> tuple[Any, list[dict]]:
        """`mu` optimizer updates on one rollout batch. The old log-probs (mu > 1) and the reference log-probs
        (beta > 0) are recorded once, before the first update. Returns (new state, host metrics of each update)."""
        if self.old_fn is not None:
            batch = dict(batch, old_logp=self.old_fn(state.params, state.frozen, batch))
        if self.ref_fn is not None:
            batch = dict(batch, ref_logp=self.ref_fn(state.params, state.frozen, batch, self.reference.store))
        ms = []
        for _ in range(self.mu):
            state, m = self.step_fn(state, batch)
            ms.append(m)
        return state, jax.device_get(ms)


def build_parts(cfg, comps) -> GRPOParts:
    """Model state (random init or `model.checkpoint`), optimizer over `train.steps * grpo.mu` updates, the
    reference (taken now: the starting weights), the jitted update and log-prob functions and the rollout runner."""
    from coordexp_jax.train import sharding as shd, state as state_lib, step as step_lib

    mesh = shd.make_mesh(cfg.mesh)
    T, g = cfg.train, cfg.grpo
    mu = int(g.mu)
    sched_box = {}

    def make_tx(params_abs):
        tx, sched_box["s"] = optim.make_optimizer(cfg, params_abs, T.steps * mu, comps.vocab_size, comps.coord_start)
        return tx

    graphdef, state, shardings, tx = state_lib.create_state(
        comps.make_model, optim.trainable_filter(cfg), make_tx, mesh, cfg.mesh.rules, T.seed,
        ema=T.ema_decay > 0, spec_fn=comps.spec_fn, materialize=comps.materialize)
    trainable_names = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    reference = Reference.from_params(cfg, state.params, comps.vocab_size, comps.coord_start) if g.beta > 0 else None
    objective = GRPOObjective(temperature=float(g.temperature), chunk=int(g.logp_chunk), epsilon=float(g.epsilon),
                              epsilon_high=float(g.epsilon_high), beta=float(g.beta), aggregation=g.aggregation)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, objective, tx, sched_box["s"], T.ema_decay), shardings, mesh)
    old_fn = make_logp_fn(graphdef, objective.temperature, objective.chunk, mesh=mesh) if mu > 1 else None
    ref_fn = make_logp_fn(graphdef, objective.temperature, objective.chunk, reference, mesh) if reference else None
    return GRPOParts(graphdef, state, shardings, objective, step_fn, old_fn, ref_fn, reference,
                     GRPORunner(cfg, comps, graphdef, mesh), mesh, mu, trainable_names)


def train_grpo(cfg, workdir: str, *, components=None, eval_hook=None, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) GRPO training in `workdir`; the counterpart of `loop.train` for `train.kind = 'grpo'`.

    Several processes (`jax.distributed`): every process runs this with its own share of the prompts (its data
    iterator; `data.batch_size` is global); the rollout, the log-prob forwards and the updates run on global arrays
    (`GRPORunner.rollout`, `GRPOParts.to_device`), only process 0 writes metrics (checkpoints: every process its
    part, as the SFT loop).

    Returns the summary dict of `loop.train` (step = rollout batches done, last metrics, eval, state, ...) plus
    `sampler_compiles`. Raises `GRPOError` (no reward; several processes with a rollout batch the data-parallel
    size does not divide, or with the built-in reward evaluation on), `loop.NonFiniteLossError` (non-finite loss
    with train.nan_policy 'stop'), `checkpoint.IncompatibleCheckpointError` (the workdir holds another run).
    """
    from coordexp_jax.train import checkpoint as ckpt_lib, config as config_lib, loop as loop_lib
    from coordexp_jax.train import state as state_lib
    from coordexp_jax.train.build import build_components, num_params

    cfg = config_lib.validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        config_lib.write_resolved(cfg, workdir)
    comps = components or build_components(cfg)
    T = cfg.train
    hook = eval_hook if eval_hook is not None else reward_eval_hook(cfg, comps)
    _check_processes(cfg, builtin_eval=eval_hook is None and hook is not None)
    parts = build_parts(cfg, comps)
    state, mu = parts.state, parts.mu
    n_train, n_frozen = num_params(state.params), num_params(state.frozen)
    log.info("GRPO: parameters: %d trainable, %d frozen; reference keeps %d values", n_train, n_frozen,
             num_params(parts.reference.store) if parts.reference else 0)

    ckpt = ckpt_lib.Checkpointer(workdir, ckpt_lib.fingerprint(cfg, comps.vocab_size, parts.trainable_names),
                                 keep_n=T.keep_n, async_save=T.async_checkpoint)
    restored = ckpt.restore(state_lib.abstract_state(state, parts.shardings), comps.data_iter)
    if restored is not None:
        state = restored[0]
    parts.state = None  # the loop owns the state (the step donates it)
    start = int(jax.device_get(state.step)) // mu
    saved_step = start if restored is not None else None  # the latest step with a checkpoint (never saved twice)
    if restored is not None:
        log.info("resumed from rollout step %d", start)

    writer = loop_lib.MetricsWriter(workdir, T.tensorboard, cfg=cfg)

    def run_eval(step):
        if hook is None:
            return {}
        params = state.ema if (state.ema is not None and cfg.eval.use_ema) else state.params
        params = jax.tree.map(lambda e, p: e.astype(p.dtype), params, state.params)
        res = hook(nnx.merge(parts.graphdef, params, state.frozen), step, workdir)
        writer.write(step, res, kind="eval")
        log.info("eval at step %d: %s", step, metrics_log.eval_log_line(res, workdir, step))
        return res

    pbar = None
    if T.progress and jax.process_index() == 0:
        from tqdm import tqdm

        pbar = tqdm(total=T.steps, initial=start, desc="grpo", dynamic_ncols=True)
    t0 = time.time()
    compiles, skipped, step, done_here = 0, 0, start, 0
    last: dict[str, float] = {}
    eval_res: dict[str, float] = {}
    out_of_time = False
    reason = "complete" if start >= T.steps else None
    try:
        while step < T.steps:
            micro = [next(comps.data_iter) for _ in range(T.grad_accum)]
            micro, host = parts.runner.rollout(micro, state.params, state.frozen, step)
            t_up = time.perf_counter()
            state, ms = parts.update(state, parts.to_device(micro))
            host["update_s"] = time.perf_counter() - t_up
            step += 1
            done_here += 1
            m = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
            m["nonfinite"] = float(max(x["nonfinite"] for x in ms))
            m = _rename(m, parts.objective.metric_names)
            m.update(host)
            n_comp = parts.step_fn._cache_size()
            if n_comp != compiles:
                if compiles:
                    log.info("GRPO update compiled for a new shape at step %d (%d variants)", step, n_comp)
                compiles = n_comp
            if m["nonfinite"]:
                if T.nan_policy == "stop":
                    ckpt.wait()
                    reason = "nonfinite"
                    raise loop_lib.NonFiniteLossError(
                        f"non-finite GRPO loss {m['loss']} (grad norm {m['grad_norm']}) at step {step}; the state was "
                        "not updated. Set train.nan_policy='skip' to skip such batches.")
                skipped += 1
                log.warning("step %d: non-finite loss, update skipped (%d so far)", step, skipped)
            if T.ckpt_every and step % T.ckpt_every == 0 and step < T.steps:
                ckpt.save(step, state, comps.data_iter)  # the iterator is exactly at this step's boundary
                saved_step = step
            out_of_time = bool(T.max_minutes) and (time.time() - t0) / 60 >= T.max_minutes
            finishing = step >= T.steps or out_of_time or (stop_after is not None and done_here >= stop_after)
            last = m
            if step % T.log_every == 0 or finishing:
                elapsed = time.time() - t0
                writer.write(step, dict(m, compiles=compiles, skipped=float(jax.device_get(state.skipped)),
                                        elapsed_s=elapsed, steps_per_s=done_here / max(elapsed, 1e-9)))
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0.0):.4f}",
                                 parse=f"{m['parse_rate']:.2f}")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < T.steps:
                eval_res = run_eval(step)
            if finishing:
                reason = "steps" if step >= T.steps else "max_minutes" if out_of_time else "stop_after"
                break
        if saved_step != step:  # a stop on a checkpoint step (or a finished run re-run) has its checkpoint
            ckpt.save(step, state, comps.data_iter, force=True)
            saved_step = step
        ckpt.wait()
        if reason == "complete":  # a re-run of a finished run: evaluate only if the earlier call did not
            eval_res = {k: v for k, v in loop_lib.read_metrics(workdir, "eval").get(step, {}).items()
                        if k not in ("step", "kind")}
            missing = not eval_res
            if jax.process_count() > 1:  # only process 0 writes metrics.jsonl; every process takes its branch
                from jax.experimental import multihost_utils

                missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
            if cfg.eval.at_end and missing:
                eval_res = run_eval(step)
        elif cfg.eval.at_end and reason in ("steps", "max_minutes"):
            eval_res = run_eval(step)
    finally:
        if pbar is not None:
            pbar.close()
        if reason is not None:
            msg = loop_lib.stop_message(reason, step, T.steps, minutes=(time.time() - t0) / 60,
                                        max_minutes=T.max_minutes)
            (log.info if reason in ("steps", "complete") else log.warning)("%s", msg)
            writer.event(step, "stop", reason=reason, message=msg, steps_run=done_here)
        writer.close()
        ckpt.close()
    sampler = parts.runner.sampler
    return {"step": step, "metrics": last, "eval": eval_res, "skipped": skipped, "compiles": compiles,
            "trainable_params": n_train, "frozen_params": n_frozen, "graphdef": parts.graphdef, "state": state,
            "model_config": comps.model_config, "stop_reason": reason, "steps_run": done_here,
            "sampler_compiles": sampler.compile_count() if sampler else 0}


def _check_processes(cfg, builtin_eval: bool) -> None:
    """Several processes: raises GRPOError (one line) for what does not run across processes yet, before the model
    is built: a global rollout or update batch (`data.batch_size` x `grpo.num_generations` rows) that the
    data-parallel size (mesh data x fsdp) does not divide, and the built-in reward evaluation (`builtin_eval`:
    `reward_eval_hook` with held-out records, run when `eval.every` or `eval.at_end`; its greedy rollouts are not
    global). One process: nothing to check."""
    from coordexp_jax.train import sharding as shd
    from coordexp_jax.train.build import per_process_batch

    n = jax.process_count()
    if n == 1:
        return
    G = int(cfg.grpo.num_generations)
    local = per_process_batch(int(cfg.data.batch_size)) * G  # rows of this process's update batch
    dp = int(np.prod([shd.make_mesh(cfg.mesh).shape[a] for a in shd.BATCH_AXES]))
    for what, rows in (("update", n * local), ("rollout", n * next_pow2(local))):  # the sampler pads rows to 2^k
        if rows % dp:
            raise GRPOError(f"train.kind='grpo' on {n} processes: the global {what} batch of {rows} rows "
                            f"(data.batch_size={cfg.data.batch_size} x grpo.num_generations={G}) is not divisible by "
                            f"the data-parallel size {dp} (mesh data x fsdp); change data.batch_size")
    if builtin_eval and (cfg.eval.every or cfg.eval.at_end):
        raise GRPOError(f"train.kind='grpo' on {n} processes: the reward evaluation (eval.every={cfg.eval.every}, "
                        f"eval.at_end={cfg.eval.at_end}) runs in one process only; set eval.every=0 and "
                        "eval.at_end=False and score the exported model with one process")


def _rename(m: dict, metric_names: Sequence[str]) -> dict:
    """Train-step metrics -> GRPO names: 'loss/grpo' is the loss; 'loss/<metric>' of grpo_loss lose the prefix;
    the per-term counts (the number of micro-batches) are dropped."""
    out = {}
    for k, v in m.items():
        if k.startswith("count/") or k == "loss/grpo":
            continue
        if k.startswith("loss/") and k[5:] in metric_names:
            out[k[5:]] = v
        else:
            out[k] = v
    return out


__all__ = ["train_grpo", "build_parts", "GRPOParts", "GRPOObjective", "GRPORunner", "Reference", "completion_batch",
           "completion_logprobs", "repeat_prompts", "ground_truth", "score_records", "reward_eval_hook", "GRPOError"]
