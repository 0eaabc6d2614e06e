"""One process of a two-process Stage-2 + GRPO run on localhost (or the one-process reference): the tiny Qwen3-VL with
images trains 3 steps through `loop.train` with `stage2.ratio = 1` (every step a rollout step) on a fixed global batch
of 4 rows, then, in the same process, 2 GRPO steps (`train.kind = 'grpo'`, G = 2 sampled answers per prompt, the KL
term to the reference on) from the same start; process i of n collates rows [i*4/n, (i+1)*4/n) of each global batch
itself (its own image slots and `visual_index`, as the Grain pipeline's per-process shard does). Writes
WORKDIR/result_<process>.json (losses, Stage-2 metrics, the rollouts of this process's rows; under 'grpo' the GRPO
rollouts, rewards, advantages and logged metrics) and, on process 0, WORKDIR/params.npz, params_grpo.npz and
params_grpo_start.npz (trained parameters and GRPO's starting ones, gathered).
Usage: _stage2_multiproc_check.py DATA_DIR (WORKDIR | --prepare) (env: COORDEXP_*)."""

import json
import os
import sys

from coordexp_jax.train import sharding as shd

shd.maybe_initialize_distributed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402

from coordexp_jax.coord import protocols  # noqa: E402
from coordexp_jax.data import prompts, records  # noqa: E402
from coordexp_jax.data.tokenizer import load_tokenizer  # noqa: E402
from coordexp_jax.rollout.sampler import Rollout  # noqa: E402
from coordexp_jax.rl import rewards as R  # noqa: E402
from coordexp_jax.train import build as B, config as C, grpo_loop as GL, loop, stage2 as S2  # noqa: E402

GLOBAL_BATCH = 4


class RowsIterator:
    """Global batch i = records [4i, 4i+4) (cycling); this process collates its contiguous share of the rows."""

    def __init__(self, recs, enc, coll):
        self.recs, self.enc, self.coll, self.i = recs, enc, coll, 0

    def __iter__(self):
        return self

    def __next__(self):
        n, p = jax.process_count(), jax.process_index()
        rows = GLOBAL_BATCH // n
        idx = [(self.i * GLOBAL_BATCH + p * rows + r) % len(self.recs) for r in range(rows)]
        self.i += 1
        return self.coll([self.enc(self.recs[j]) for j in idx])

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def make_config(data_dir, kind="sft"):
    cfg = C.base_config()
    cfg.data.path = data_dir
    cfg.data.num_train, cfg.data.num_eval, cfg.data.batch_size, cfg.data.max_objects = 8, 1, GLOBAL_BATCH, 3
    cfg.data.image_size, cfg.data.seq_len = 64, 128
    cfg.loss.l1 = 1.0  # a box term: the rewritten rows' box targets reach the loss
    cfg.optim.lr, cfg.optim.eps = 1e-2, 1.0  # eps 1: a smooth update, so tiny gradient differences stay tiny
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = 3, 1, 0
    cfg.train.progress = cfg.train.tensorboard = cfg.train.async_checkpoint = False
    cfg.eval.at_end, cfg.eval.every = False, 0
    cfg.stage2.ratio, cfg.stage2.max_new_tokens = 1.0, 24
    cfg.mesh.data = -1
    if kind == "grpo":  # the same model, data and optimizer; sampled rollouts, rewards, group advantages, KL term
        cfg.train.kind, cfg.stage2.ratio, cfg.train.steps = "grpo", 0.0, 2
        cfg.grpo.num_generations, cfg.grpo.max_new_tokens, cfg.grpo.temperature = 2, 96, 1.0  # answers <= 88
        cfg.grpo.beta, cfg.grpo.mu = 0.04, 1  # beta > 0: the reference log-prob forward runs every step
        cfg.optim.lr = 0.5  # eps = 1: update ~ lr * gradient; the GRPO gradients are ~1e-3, so parameters move ~1e-3
    return C.validate(cfg)


def _gathered(tree):
    from jax.experimental import multihost_utils

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
            if jax.process_count() > 1 else np.asarray(x) for p, x in flat}


def run_grpo(data_dir, workdir, comps, make_iter):
    """2 GRPO steps. The random model's samples never parse (every reward 0, every advantage 0), so after the real
    global rollout is recorded, sample g = 1 of each prompt is replaced by the prompt's own answer with its coordinate
    bins moved by 1, 3 or 5 (by the prompt's global index): it parses and earns a reward below 1, while sample 0
    (the real one) earns 0; the group of global prompt 3 keeps both real samples (a zero-std group, advantages 0)."""
    cfg = make_config(data_dir, "grpo")
    comps.data_iter = make_iter()
    ids = comps.token_ids
    G = int(cfg.grpo.num_generations)
    rec = {"rollouts": [], "rewards": [], "advantages": []}
    box = {}
    real_generate, real_rollout, real_rewards, real_parts = (GL.GRPORunner.generate, GL.GRPORunner.rollout,
                                                             R.compute_rewards, GL.build_parts)

    def build_parts(*a, **k):
        box["parts"] = parts = real_parts(*a, **k)
        box["start"] = _gathered(parts.state.params)  # the starting weights (no checkpoint in the workdir)
        return parts

    def rollout(self, micro, *a, **k):
        box["micro"], box["a"] = micro, 0
        out, m = real_rollout(self, micro, *a, **k)
        rec["advantages"].append([float(x) for mb in out for x in mb["advantages"]])
        return out, m

    def compute_rewards(*a, **k):
        total, per = real_rewards(*a, **k)
        rec["rewards"].append([float(x) for x in total])
        return total, per

    def generate(self, prompts, key):
        ro = real_generate(self, prompts, key)
        rec["rollouts"].append({"tokens": ro.tokens.tolist(), "lengths": ro.lengths.tolist(),
                                "logprobs": ro.logprobs.tolist()})
        batch = box["micro"][box["a"]]
        box["a"] += 1
        plen = S2.prompt_lengths(batch)
        n_tok = np.asarray(batch["attention_mask"]).sum(-1)
        tokens, lengths = ro.tokens.copy(), ro.lengths.copy()
        first = jax.process_index() * len(plen)  # global index of this process's first prompt
        for b, p in enumerate(plen):
            if first + b == 3:
                continue
            ans = np.asarray(batch["input_ids"])[b, p:n_tok[b]]
            ans = np.where(ids.is_coord(ans), np.minimum(ans + 1 + 2 * ((first + b) % 3), ids.coord_end - 1), ans)
            n = min(len(ans), tokens.shape[1])
            tokens[b * G + 1, :n], lengths[b * G + 1] = ans[:n], n
        return Rollout(tokens=tokens, logprobs=ro.logprobs, sample_logprobs=ro.sample_logprobs,
                       coord_expectation=ro.coord_expectation, lengths=lengths, finished=ro.finished)

    GL.GRPORunner.generate, GL.GRPORunner.rollout, R.compute_rewards, GL.build_parts = (
        generate, rollout, compute_rewards, build_parts)
    try:
        res = loop.train(cfg, os.path.join(workdir, "grpo"), components=comps)
    finally:
        GL.GRPORunner.generate, GL.GRPORunner.rollout, R.compute_rewards, GL.build_parts = (
            real_generate, real_rollout, real_rewards, real_parts)
    if jax.process_index() == 0:
        rec["metrics"] = [{k: v for k, v in m.items() if not k.endswith("_s") and k not in ("step", "kind")}
                          for _, m in sorted(loop.read_metrics(os.path.join(workdir, "grpo")).items())]
    return rec, _gathered(res["state"].params), box["start"]


def main(data_dir, workdir):
    cfg = make_config(data_dir)
    comps = B.build_components(cfg)
    pcfg = comps.extra["prompt_config"]
    tok = load_tokenizer(comps.tokenizer_dir)
    recs, _ = records.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    make_iter = lambda: RowsIterator(recs, prompts.SampleEncoder(pcfg, tokenizer=tok),  # noqa: E731
                                     prompts.Collator(pcfg, comps.token_ids, comps.model_config))
    comps.data_iter = make_iter()

    # The random model's rollouts never parse, so every row would fall back to its Stage-1 answer. The real global
    # rollout is recorded, then `rollout_batch` gets each row's own answer with every coordinate bin moved by +2:
    # it parses, matches its ground truth and is rewritten (matched targets, expectation boxes off -> emitted bins).
    seen = []
    real = S2.rollout_batch
    ids = comps.token_ids

    def rollout_batch(batch, ro, *a, **k):
        seen.append({"tokens": ro.tokens.tolist(), "lengths": ro.lengths.tolist(), "logprobs": ro.logprobs.tolist()})
        plen = S2.prompt_lengths(batch)
        n_tok = np.asarray(batch["attention_mask"]).sum(-1)
        T = ro.tokens.shape[1] + int(n_tok.max())
        tokens = np.full((len(plen), T), ids.pad, np.int32)
        lengths = np.zeros(len(plen), np.int32)
        for b, p in enumerate(plen):
            ans = np.asarray(batch["input_ids"])[b, p:n_tok[b]]
            ans = np.where(ids.is_coord(ans), np.minimum(ans + 2, ids.coord_end - 1), ans)
            tokens[b, :len(ans)], lengths[b] = ans, len(ans)
        z = np.zeros(tokens.shape, np.float32)
        fake = Rollout(tokens=tokens, logprobs=z, sample_logprobs=z, coord_expectation=np.full_like(z, np.nan),
                       lengths=lengths, finished=np.ones(len(plen), bool))
        return real(batch, fake, *a, **k)

    S2.rollout_batch = rollout_batch
    res = loop.train(cfg, workdir, components=comps)
    out = {"devices": jax.device_count(), "processes": jax.process_count(), "rollouts": seen}
    if jax.process_index() == 0:
        recs_m = loop.read_metrics(workdir)
        out["losses"] = [recs_m[s]["loss"] for s in sorted(recs_m)]
        out["stage2"] = [{k: v for k, v in m.items() if not k.endswith("_s") and k not in ("step", "kind")}
                         for _, m in sorted(loop.read_metrics(workdir, "stage2").items())]
    arrays = _gathered(res["state"].params)
    S2.rollout_batch = real
    out["grpo"], grpo_arrays, grpo_start = run_grpo(data_dir, workdir, comps, make_iter)
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "params.npz"), **arrays)
        np.savez(os.path.join(workdir, "params_grpo.npz"), **grpo_arrays)
        np.savez(os.path.join(workdir, "params_grpo_start.npz"), **grpo_start)
    with open(os.path.join(workdir, f"result_{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    if sys.argv[2] == "--prepare":  # only write the synthetic set (before processes that would race to write it)
        B.data_specs(make_config(sys.argv[1]))
    else:
        sys.exit(main(sys.argv[1], sys.argv[2]))
