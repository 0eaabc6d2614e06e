"""A small stand-in NNX language model and objective for testing the generic training pieces (mesh, optimizer,
LoRA, step, checkpoints) without the real Qwen3-VL: an embedding, two pre-norm blocks of nnx.Linear projections
(named like Qwen's), a 'visual' tower + 'merger' fed by a feature vector, and an untied lm_head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

VOCAB = 1088  # holds the 1000 coordinate rows from COORD_START
COORD_START = 80
HIDDEN = 32
FEAT = 8


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.RMSNorm(HIDDEN, rngs=rngs)
        self.q_proj = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(HIDDEN, 2 * HIDDEN, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(2 * HIDDEN, HIDDEN, use_bias=False, rngs=rngs)

    def __call__(self, h):
        x = self.norm(h)
        # causal "attention" by a cumulative mean of values gated by queries (cheap, position-mixing)
        v = self.v_proj(x)
        steps = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        mix = jnp.cumsum(v, axis=1) / steps
        h = h + self.o_proj(jax.nn.sigmoid(self.q_proj(x)) * mix)
        return h + self.down_proj(jax.nn.gelu(self.up_proj(self.norm(h))))


class Visual(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(FEAT, HIDDEN, rngs=rngs)


class Merger(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)


class StandIn(nnx.Module):
    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed_tokens = nnx.Embed(VOCAB, HIDDEN, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.visual = Visual(rngs)
        self.merger = Merger(rngs)
        self.norm = nnx.RMSNorm(HIDDEN, rngs=rngs)
        self.lm_head = nnx.Linear(HIDDEN, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, input_ids, feat):
        h = self.embed_tokens(input_ids)
        img = self.merger.fc(jax.nn.gelu(self.visual.proj(feat)))
        h = h.at[:, 0].add(img)
        for blk in self.layers:
            h = blk(h)
        return self.lm_head(self.norm(h))


_SPECS = {
    "embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "q_proj/kernel": ("embed", "q_heads"),
    "v_proj/kernel": ("embed", "kv_heads"),
    "o_proj/kernel": ("q_heads", "embed"),
    "up_proj/kernel": ("embed", "mlp"),
    "down_proj/kernel": ("mlp", "embed"),
    "lora_a": ("embed", "lora_rank"),
    "lora_b": ("lora_rank", None),
}


def spec_fn(state):
    """Logical PartitionSpecs by parameter path (what model.sharding provides for the real model)."""
    from coordexp_jax.train.optim import path_str

    def one(path, leaf):
        p = path_str(path)
        for suffix, spec in _SPECS.items():
            if p.endswith(suffix):
                return P(*spec[: leaf.ndim])
        return P()

    return jax.tree_util.tree_map_with_path(one, state)


class Objective:
    """CE (sum over loss_mask) + an L2 'box' term over box_valid rows, with counts from the masks."""

    def __init__(self, ce=1.0, box=0.5):
        self.weights = {"ce": ce, "box": box}

    def counts(self, batch):
        return {"ce": batch["loss_mask"].sum(), "box": batch["box_valid"].sum()}

    def sums(self, model, batch, rng):
        logits = model(batch["input_ids"], batch["feat"]).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
        ce = (nll * batch["loss_mask"]).sum()
        pred = jax.nn.sigmoid(logits[:, 1, :4])
        box = (((pred - batch["box"]) ** 2).sum(-1) * batch["box_valid"]).sum()
        return {"ce": ce, "box": box}


def make_batch(seed: int, batch: int, seq: int = 12, micro: int = 1):
    """A numpy batch with a leading micro-batch axis [micro, batch // micro, ...] and uneven mask counts."""
    r = np.random.default_rng(seed)
    ids = r.integers(0, VOCAB, (batch, seq)).astype(np.int32)
    lens = r.integers(2, seq + 1, (batch,))
    mask = (np.arange(seq)[None] < lens[:, None]).astype(np.float32)
    out = {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": mask,
        "feat": r.normal(size=(batch, FEAT)).astype(np.float32),
        "box": r.uniform(size=(batch, 4)).astype(np.float32),
        "box_valid": (r.uniform(size=(batch,)) < 0.7).astype(np.float32),
    }
    return {k: v.reshape((micro, batch // micro) + v.shape[1:]) for k, v in out.items()}


def build(cfg, mesh=None, seed=0, steps=10, lora=False, model_seed=0):
    """(graphdef, state, shardings, jitted step, schedule) for the stand-in under `cfg` on `mesh`."""
    from flax import nnx as _nnx

    from coordexp_jax.train import lora as L, optim, sharding as shd, state as S, step as ST

    mesh = mesh or shd.make_mesh(cfg.mesh)

    def make_model():
        m = StandIn(model_seed)
        if lora or cfg.lora.enabled:
            L.apply_lora(m, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, _nnx.Rngs(model_seed + 1))
        return m

    sched = {}

    def make_tx(p):
        tx, sched["s"] = optim.make_optimizer(cfg, p, steps, VOCAB, COORD_START)
        return tx

    g, st, sh, tx = S.create_state(make_model, optim.trainable_filter(cfg), make_tx, mesh, cfg.mesh.rules, seed,
                                   ema=cfg.train.ema_decay > 0, spec_fn=spec_fn)
    fn = ST.jit_train_step(ST.make_train_step(g, Objective(), tx, sched["s"], cfg.train.ema_decay), sh, mesh)
    return g, st, sh, fn, mesh


class ListIterator:
    """An in-memory data iterator with Grain-like get_state/set_state: batch i is `make_batch(seed + i, ...)`,
    except indices in `bad` get a NaN feature."""

    def __init__(self, batch: int = 4, seed: int = 100, bad=()):
        self.i, self.batch, self.seed, self.bad = 0, batch, seed, set(bad)

    def __iter__(self):
        return self

    def __next__(self):
        b = {k: v[0] for k, v in make_batch(self.seed + self.i, self.batch).items()}
        if self.i in self.bad:
            b["feat"][0, 0] = np.nan
        self.i += 1
        return b

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def components(batch: int = 4, bad=(), model_seed: int = 0):
    from coordexp_jax.train.build import Components

    return Components(make_model=lambda: StandIn(model_seed), objective=Objective(), data_iter=ListIterator(batch, bad=bad),
                      vocab_size=VOCAB, coord_start=COORD_START, spec_fn=spec_fn)


def loop_config(steps: int = 6, **overrides):
    """A base train config for the stand-in loop tests: lr 1e-2, `steps` steps, log every step, checkpoint every 2,
    no progress bar/TensorBoard/async checkpointing/final evaluation; `overrides` maps dotted keys to values."""
    from coordexp_jax.train import config as C

    cfg = C.base_config()
    cfg.optim.lr = 1e-2
    cfg.train.steps = steps
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 2
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.train.async_checkpoint = False
    cfg.eval.at_end = False
    for k, v in overrides.items():
        node = cfg
        *head, leaf = k.split(".")
        for h in head:
            node = node[h]
        node[leaf] = v
    return cfg
