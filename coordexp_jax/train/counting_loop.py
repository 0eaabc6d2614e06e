"""Sequential counting with regression heads (`train.kind = 'counting_regression'`): data, model, evaluation.

`python -m coordexp_jax.train --config configs/counting_demo.py` runs it through the ordinary loop of
`train/loop.py` (resume, metrics.jsonl / TensorBoard, orbax checkpoints with the data iterator, `train.max_minutes`,
the final model): `loop.train` hands a counting config to `prepare`, which supplies the loop's `Components` and
evaluation hook:

- model: Qwen3-VL (random init or `model.checkpoint`, LoRA per `lora.*`) with two regression heads attached
  (`model/regression.py`: `counting.head_layers` Linear layers of width `counting.head_width`, tanh), trained at
  `optim.lr * optim.heads.lr_mult` (default 5x, `train/optim.py` group 'heads');
- tokenizer: `tokenizer.path`, or the project's small tokenizer with `<x>` `<y>` (`SMALL_XY_TOKENIZER_DIR`); the
  pair is required (ConfigError naming `tokenizer.path`: expand with `tools/expand_coord_vocab.py
  --with_regression`);
- data: counting records (`data.kind = 'synthetic'`: one shape class, `data.min_objects..data.max_objects`
  instances with clutter, generated once under the cache; 'jsonl': `data.path` / `data.eval_path`), one counting
  step per row built by `data/counting.py` (`CountingSampler`: order `counting.order`, k drawn per (seed, epoch,
  index), the first k objects marked with numbers, the (k+1)-th centre as target; "all counted" samples with
  probability `counting.done_prob`), encoded by `encode_counting`;
- objective: `train/counting_objective.py` (L1 / MSE / smooth L1 on x and y, `loss/x`, `loss/y`);
- first step (`counting.grad_check`): the gradient of the first batch must be non-zero on the heads and, with LoRA,
  on the LoRA weights; the norms are logged (metrics.jsonl kind 'grad_check') and a zero one raises
  `GradientFlowError`;
- evaluation (`eval.every`, `eval.at_end`): `eval.num_images` held-out records counted one object at a time by
  `coordexp_jax.counting.count_sequentially` with a jitted prefill-only `predict_next` (one forward of the
  marked image and the prompt; the heads at `<x>`/`<y>`), up to `counting.max_count` points; counting MAE / RMSE,
  hit rate and mean point error (`metrics.sequential_counting_metrics`), the "predict the training mean count"
  baseline's MAE, and `eval.num_pictures` (0: one per image) side-by-side pictures (input | output with numbered marks and the ground
  truth, the prompt as caption) under `workdir/eval/step_<N>/`.

The prompt of a row is the chat's system turn (when the counting config has one) and the user turn up to its last
token `<y>`: `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|>..
<|vision_end|>{prompt ending "<x> <y>"}`. Nothing after `<y>` can change the two hidden states (causal
attention), so nothing follows it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordexp_jax.data.tokenizer import SMALL_XY_TOKENIZER_DIR, TokenIds, encode_text
from coordexp_jax.errors import CoordExpError

log = logging.getLogger(__name__)

BATCH_KEYS = ("x_pos", "y_pos", "target", "valid")
SYNTHETIC_CLASS = "circle"


class GradientFlowError(CoordExpError, RuntimeError):
    """The first step's gradient is zero on the regression heads or on the LoRA weights: they would not train."""


# ------------------------------------------------------------------------------------------------ config pieces
def tokenizer_dir(cfg) -> str:
    """`tokenizer.path`, or the small tokenizer with `<x>` `<y>`."""
    from coordexp_jax.train.build import _check_path

    return _check_path("tokenizer.path", cfg.tokenizer.path) if cfg.tokenizer.path else SMALL_XY_TOKENIZER_DIR


def token_ids(cfg) -> TokenIds:
    """The tokenizer's ids; ConfigError naming `tokenizer.path` when it lacks `<x>` / `<y>`."""
    from coordexp_jax.data.tokenizer import load_tokenizer, token_ids_from_tokenizer
    from coordexp_jax.train.config import ConfigError

    path = tokenizer_dir(cfg)
    ids = token_ids_from_tokenizer(load_tokenizer(path), require_coords=False, name=path)
    if not ids.has_regression:
        raise ConfigError(f"config key 'tokenizer.path': tokenizer {path} has no <x> / <y> tokens (train.kind "
                          f"'counting_regression'); add them with tools/expand_coord_vocab.py --with_regression")
    return ids


def sequential_config(cfg):
    """The `data.counting.SequentialCountingConfig` of `cfg.counting` (done samples iff `counting.done_prob > 0`;
    `counting.template` / `counting.system_prompt` replace the seed's prompts). ConfigError naming the counting key
    of a bad value."""
    from coordexp_jax.data import counting as C

    p = float(cfg.counting.done_prob)
    kw = {"template": cfg.counting.template} if cfg.counting.template else {}
    if not cfg.counting.system_prompt:
        kw["system_template"] = None
    try:
        return C.SequentialCountingConfig(order=cfg.counting.order, target=cfg.counting.get("target", "ordered"),
                                          mark_jitter=float(cfg.counting.get("mark_jitter", 0.0)),
                                          set_band=float(cfg.counting.get("set_band", 0.0)),
                                          include_done=p > 0, done_prob=p, **kw)
    except C.CountingConfigError as e:
        from coordexp_jax.train.config import ConfigError

        # every message names the field first ("SequentialCountingConfig.<field> ..."); the prompts' keys differ
        field = str(e).split()[0].rpartition(".")[2]
        key = {"template": "counting.template", "system_template": "counting.system_prompt"}.get(
            field, f"counting.{field}")
        raise ConfigError(f"config key '{key}': {e}") from None


def synthetic_config(cfg):
    """The synthetic counting set: one shape class, `data.min_objects..max_objects` instances (sized so that 12
    fit a 128 px image without hiding one another), clutter."""
    from coordexp_jax.data import synthetic as syn

    s = cfg.data.image_size
    return syn.SyntheticConfig(image_size=(s, s), classes=(SYNTHETIC_CLASS,), min_objects=cfg.data.min_objects,
                               max_objects=cfg.data.max_objects, min_size_frac=0.09, max_size_frac=0.16,
                               max_overlap=0.05, clutter=4)


def synthetic_dir(cfg) -> str:
    if cfg.data.path:
        return cfg.data.path
    key = json.dumps({"counting": dataclasses.asdict(synthetic_config(cfg)), "n": cfg.data.num_train,
                      "v": cfg.data.num_eval, "seed": cfg.data.seed}, sort_keys=True, default=str)
    root = os.environ.get("COORDEXP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "coordexp_jax"))
    return os.path.join(root, "counting_" + hashlib.sha1(key.encode()).hexdigest()[:10])


def counting_records(cfg) -> tuple[list, list]:
    """(train records, held-out records) of `cfg.data` (see the module docstring); paths checked (DataPathError)."""
    from coordexp_jax.data import records as R, synthetic as syn
    from coordexp_jax.train.build import _check_path

    if cfg.data.kind == "synthetic":
        paths = syn.ensure_dataset(synthetic_dir(cfg), cfg.data.num_train, max(cfg.data.num_eval, 1),
                                   seed=cfg.data.seed, cfg=synthetic_config(cfg))
        return R.read_jsonl(paths["train"]["jsonl"])[0], R.read_jsonl(paths["val"]["jsonl"])[0]
    if cfg.data.kind != "jsonl":
        from coordexp_jax.train.config import ConfigError

        raise ConfigError(f"config key 'data.kind' = {cfg.data.kind!r}: counting_regression reads 'synthetic' or "
                          f"'jsonl' records")
    train = R.read_jsonl(_check_path("data.path", cfg.data.path))[0]
    val = R.read_jsonl(_check_path("data.eval_path", cfg.data.eval_path))[0] if cfg.data.eval_path else []
    return train, val


# ------------------------------------------------------------------------------------------------ encoding
class CountingEncoder:
    """Counting samples (marked image, system, prompt, target) -> the batch of `counting_objective`.

    `tokenizer`, `ids` (with `<x>` `<y>`), `pcfg` (`data.prompts.PromptConfig`: image settings, text bucket,
    patches per image slot), `model_config` (vision table size, image token id). `num_candidates` > 0 (the
    `set` target, `counting.target`): training batches also hold `candidates [B, M, 2]` float32 (each row's
    right answers, `CountingSample.candidates`, zero-padded to M = `num_candidates`) and `candidate_mask [B, M]`
    float32 (1 on the real ones); ValueError when a sample has more than M."""

    def __init__(self, tokenizer, ids: TokenIds, pcfg, model_config, num_candidates: int = 0):
        self.tok, self.ids, self.pcfg, self.mc = tokenizer, ids, pcfg, model_config
        self.num_candidates = int(num_candidates)
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = encode_text(self.tok, text)
        return list(self._cache[text])

    def prompt_ids(self, system: str | None, prompt: str, num_image_tokens: int) -> list[int]:
        """System turn (if any) + user turn through the prompt's last token (module docstring)."""
        t = self.ids
        out: list[int] = []
        if system is not None:
            out += [t.im_start] + self._enc("system\n" + system) + [t.im_end] + self._enc("\n")
        out += [t.im_start] + self._enc("user\n") + [t.vision_start] + [t.image_pad] * num_image_tokens
        return out + [t.vision_end] + self._enc(prompt)

    def __call__(self, images: Sequence[np.ndarray], systems: Sequence[str | None], prompts: Sequence[str],
                 targets: np.ndarray | None = None, batch_size: int | None = None) -> dict:
        """Right-padded batch of `batch_size` rows (default len(images); extra rows are copies of row 0 with
        `valid` 0): model inputs, `x_pos`, `y_pos` `[B]` int32, `target [B, 2]` float32, `valid [B]` float32.
        Raises ValueError when a prompt lacks `<x>`/`<y>` or does not fit the text bucket."""
        from coordexp_jax.data import image as image_lib
        from coordexp_jax.data.prompts import bucket_len
        from coordexp_jax.model.inputs import build_model_inputs
        from coordexp_jax.model.regression import token_positions

        n = len(images)
        B = batch_size or n
        pad = list(range(n)) + [0] * (B - n)
        pvs, grids, rows = [], [], []
        for i in pad:
            pv, grid, _ = image_lib.process_image(np.asarray(images[i]), self.pcfg.image)
            pvs.append(pv)
            grids.append(tuple(int(x) for x in grid))
            rows.append(self.prompt_ids(systems[i], prompts[i], int(np.prod(grid)) // self.pcfg.image.merge_size ** 2))
        S = bucket_len(max(len(r) for r in rows), self.pcfg)
        ids = np.full((B, S), self.ids.pad, np.int32)
        am = np.zeros((B, S), np.int32)
        for b, r in enumerate(rows):
            ids[b, :len(r)], am[b, :len(r)] = r, 1
        P = self.pcfg.patches_per_slot or max(4, 1 << int(max(np.prod(g) for g in grids) - 1).bit_length())
        out = build_model_inputs(ids, am, grids, pvs, config=self.mc, num_slots=B, patches_per_slot=P)
        out["x_pos"] = token_positions(ids, self.ids.x_token, name="<x>")
        out["y_pos"] = token_positions(ids, self.ids.y_token, name="<y>")
        tg = np.zeros((B, 2), np.float32)
        if targets is not None:
            tg[:n] = np.asarray(targets, np.float32).reshape(n, 2)
        out["target"] = tg
        out["valid"] = (np.arange(B) < n).astype(np.float32)
        return out

    def add_candidates(self, out: dict, samples: Sequence) -> dict:
        """Adds `candidates` / `candidate_mask` (class docstring) for the first len(samples) rows of `out`."""
        if self.num_candidates <= 0:
            return out
        B, M = len(out["valid"]), self.num_candidates
        cands, mask = np.zeros((B, M, 2), np.float32), np.zeros((B, M), np.float32)
        for b, s in enumerate(samples):
            c = np.asarray(s.candidates if s.candidates is not None else s.target[None], np.float32).reshape(-1, 2)
            if len(c) > M:
                raise ValueError(f"{s.source}: {len(c)} candidate points, more than the batch's {M}")
            cands[b, :len(c)], mask[b, :len(c)] = c, 1.0
        out["candidates"], out["candidate_mask"] = cands, mask
        return out

    def encode_samples(self, samples: Sequence, batch_size: int | None = None) -> dict:
        """A batch of `data.counting.CountingSample`s."""
        out = self([s.image for s in samples], [s.system for s in samples], [s.prompt for s in samples],
                   np.stack([s.target for s in samples]), batch_size)
        return self.add_candidates(out, samples)

    def encode_with_points(self, samples: Sequence, point_rows: Sequence[dict], collator) -> dict:
        """One batch of `len(samples)` counting rows followed by the point-token rows (`counting.point_tokens`):
        `point_rows` are `data.prompts.SampleEncoder` samples (task 'counting': the answer `{"count": N, "points":
        [...]}` in coordinate tokens) and `collator` the Stage-1 `data.prompts.Collator`, which pads every row to
        one length and adds `targets`, `loss_mask` (zero on the counting rows), `coord_mask` and the box keys.
        `x_pos`, `y_pos`, `target`, `valid` as in `__call__`; `valid` is 0 on the point rows."""
        from coordexp_jax.data import image as image_lib
        from coordexp_jax.model.regression import token_positions

        rows = []
        for s in samples:
            pv, grid, _ = image_lib.process_image(np.asarray(s.image), self.pcfg.image)
            ids = np.asarray(self.prompt_ids(s.system, s.prompt, int(np.prod(grid)) // self.pcfg.image.merge_size ** 2),
                             np.int32)
            rows.append({"input_ids": ids, "targets": np.full(len(ids), self.ids.pad, np.int32),
                         "loss_mask": np.zeros(len(ids), np.float32), "box_pos": np.zeros((0, 4), np.int32),
                         "box_target": np.zeros((0, 4), np.float32), "pixel_values": pv,
                         "grid_thw": np.asarray(grid, np.int32), "num_objects": np.int32(0)})
        out = collator(rows + list(point_rows))
        n, B = len(samples), len(rows) + len(point_rows)
        for key, tok, name in (("x_pos", self.ids.x_token, "<x>"), ("y_pos", self.ids.y_token, "<y>")):
            pos = np.zeros(B, np.int32)
            pos[:n] = token_positions(out["input_ids"][:n], tok, name=name)
            out[key] = pos
        out["target"] = np.zeros((B, 2), np.float32)
        out["target"][:n] = np.stack([s.target for s in samples]).astype(np.float32)
        out["valid"] = (np.arange(B) < n).astype(np.float32)
        return self.add_candidates(out, samples)


class CountingBatches:
    """Host iterator of training batches: each epoch a seeded permutation of the sampler's records, B samples per
    batch (`CountingSampler.sample(i, epoch)`: k drawn per (seed, epoch, index)). JSON-able state (epoch, position)
    for the loop's checkpoints."""

    def __init__(self, sampler, encoder: CountingEncoder, batch_size: int, seed: int = 0):
        if len(sampler) == 0:
            from coordexp_jax.data.records import DataConfigError

            raise DataConfigError("no usable counting records (every record was skipped; see the log)")
        self.sampler, self.encoder, self.B, self.seed = sampler, encoder, int(batch_size), int(seed)
        self.epoch, self.pos = 0, 0

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sampler))

    def __iter__(self):
        return self

    def _draw(self) -> tuple[list[int], list]:
        """The next B (record index, counting sample) pairs."""
        idx, samples = [], []
        while len(samples) < self.B:
            perm = self._perm(self.epoch)
            if self.pos >= len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            idx.append(int(perm[self.pos]))
            samples.append(self.sampler.sample(idx[-1], self.epoch))
            self.pos += 1
        return idx, samples

    def __next__(self) -> dict:
        return self.encoder.encode_samples(self._draw()[1])

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class CountingWithPointsBatches(CountingBatches):
    """`CountingBatches` whose every batch also holds, for each of its B records, the point-token row of the same
    (unmarked) image: CoordExp's `counting` task answer (`counting.point_tokens`), encoded by `point_encoder` (a
    `data.prompts.SampleEncoder`) and collated by `collator` (`CountingEncoder.encode_with_points`): 2B rows."""

    def __init__(self, sampler, encoder: CountingEncoder, point_encoder, collator, batch_size: int, seed: int = 0):
        super().__init__(sampler, encoder, batch_size, seed)
        self.point_encoder, self.collator = point_encoder, collator

    def __next__(self) -> dict:
        idx, samples = self._draw()
        rows = [self.point_encoder(dataclasses.replace(self.sampler.items[i][0], task="counting")) for i in idx]
        ok = [r for r in rows if r is not None]  # a dropped row (e.g. too long: logged) is replaced, so that
        if not ok:  # every batch keeps one shape
            from coordexp_jax.data.records import DataConfigError

            raise DataConfigError("counting.point_tokens: no point-token row of the batch fits data.seq_len")
        return self.encoder.encode_with_points(samples, [r if r is not None else ok[0] for r in rows],
                                               self.collator)


# ------------------------------------------------------------------------------------------------ model
def heads_config(cfg, mc):
    from coordexp_jax.model.regression import HeadsConfig

    return HeadsConfig(hidden_size=mc.text.hidden_size, layers=int(cfg.counting.head_layers),
                       width=int(cfg.counting.head_width))


def model_config(cfg, ids: TokenIds):
    """`build.model_config`, except that a `model.checkpoint` whose vocabulary lacks only `<x>` `<y>` (trained on
    the tokenizer without them, e.g. the detection demo's model with the small tokenizer) is accepted: its
    config gets the tokenizer's vocabulary size and `make_model_fn` grows the two rows (mean of the base rows,
    `weights/vocab.py`). ConfigError naming the keys for any other mismatch."""
    from coordexp_jax.train import build

    if cfg.model.checkpoint:
        from coordexp_jax.train.config import ConfigError
        from coordexp_jax.weights.checkpoint import checkpoint_config

        mc = checkpoint_config(build._check_path("model.checkpoint", cfg.model.checkpoint))
        if mc.vocab_size != ids.vocab_size:
            if not (mc.vocab_size == min(ids.x_token, ids.y_token) and ids.vocab_size == mc.vocab_size + 2):
                raise ConfigError(f"model.checkpoint {cfg.model.checkpoint} has vocab_size {mc.vocab_size}; the "
                                  f"tokenizer (config key 'tokenizer.path') has {ids.vocab_size} ids, and only the "
                                  f"<x> <y> pair at the end may be new")
            over = cfg.model.overrides.to_dict() if hasattr(cfg.model.overrides, "to_dict") else dict(cfg.model.overrides)
            mc = mc.with_vocab_size(ids.vocab_size)
            return build._replace_nested(mc, over, "model.overrides") if over else mc
    return build.model_config(cfg, ids)


def _grown_checkpoint_model(cfg, mc, ids):
    """The checkpoint's model with its vocabulary grown to `mc.vocab_size` (rows of `<x>` `<y>` = the mean of the
    base rows), its regression heads (if any) kept, then LoRA per `lora.*`."""
    from coordexp_jax.model.regression import ATTR, attach_heads, heads_of
    from coordexp_jax.train import build, lora as lora_lib
    from coordexp_jax.weights.checkpoint import load_checkpoint
    from coordexp_jax.weights.hf import abstract_model
    from coordexp_jax.weights.vocab import expand_vocab_state

    dtype, pdtype = build._DT[cfg.model.dtype], build._DT[cfg.model.param_dtype]
    old_mc, model = load_checkpoint(cfg.model.checkpoint, pdtype, compute_dtype=dtype, remat=cfg.model.remat,
                                    scan_layers=mc.scan_layers, remat_policy=mc.remat_policy)
    heads = heads_of(model)
    if old_mc.vocab_size < mc.vocab_size:
        if heads is not None:
            delattr(model, ATTR)  # the Qwen3-VL tree only
        grown, _ = expand_vocab_state(nnx.state(model, nnx.Param), old_mc, mc.vocab_size, [ids.x_token, ids.y_token],
                                      n_base=old_mc.vocab_size)
        graphdef, abstract = abstract_model(mc, pdtype, dtype, cfg.model.remat)
        target = nnx.to_pure_dict(abstract)
        nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), grown, target))
        model = nnx.merge(graphdef, abstract)
        if heads is not None:
            attach_heads(model, heads)
        log.info("model.checkpoint: vocabulary grown %d -> %d (<x> <y> rows = the mean of the base rows)",
                 old_mc.vocab_size, mc.vocab_size)
    if cfg.lora.enabled:
        exclude = None if cfg.lora.include_vision else r"(^|/)(vision|visual)\w*(/|$)"
        lora_lib.apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, nnx.Rngs(cfg.train.seed + 1),
                            exclude=exclude)
    return model


def scale_attention_logits(model, factor: float) -> None:
    """Multiplies every language-model layer's `q_norm` scale by `factor` (in place). Qwen3 normalises q and k per
    head (RMSNorm, scales near 1 in a trained model), so an attention logit q.k / sqrt(head_dim) is bounded by about
    sqrt(head_dim) x |scale_q| x |scale_k|; this multiplies every logit by `factor`, i.e. a lower softmax temperature,
    for the sharp selection sequential counting needs (one object among several similar ones). `counting.qk_scale`
    applies it once to the starting weights (a resumed run restores the trained scales)."""
    n = 0
    for path, node in nnx.iter_graph(model):
        if path and path[0] == "language_model" and path[-1] == "q_norm":
            node.scale[...] = node.scale[...] * factor
            n += 1
    if n == 0:
        raise ValueError("scale_attention_logits: the model has no language_model q_norm")


def make_model_fn(cfg, mc, ids):
    """`build.make_model_fn` (Qwen3-VL, init options, LoRA) plus the regression heads (kept when the checkpoint
    already has heads); a checkpoint without the `<x>` `<y>` rows is grown (`model_config`)."""
    from coordexp_jax.model.regression import RegressionHeads, attach_heads, heads_of
    from coordexp_jax.train import build
    from coordexp_jax.weights.checkpoint import checkpoint_config

    if cfg.model.checkpoint and checkpoint_config(cfg.model.checkpoint).vocab_size < mc.vocab_size:
        make, materialize = (lambda: _grown_checkpoint_model(cfg, mc, ids)), True
    else:
        make, materialize = build.make_model_fn(cfg, mc, ids)
    hcfg = heads_config(cfg, mc)

    qk = float(cfg.counting.qk_scale)

    def make_model():
        model = make()
        if qk != 1.0:
            scale_attention_logits(model, qk)
        if heads_of(model) is None:
            attach_heads(model, RegressionHeads(hcfg, rngs=nnx.Rngs(cfg.train.seed + 2)))
        elif heads_of(model).cfg != hcfg:
            log.warning("model.checkpoint has regression heads %s; the counting.head_* keys (%s) are ignored",
                        heads_of(model).cfg, hcfg)
        return model

    return make_model, materialize


def build_components(cfg):
    """The loop's `Components` for a counting config (module docstring)."""
    from coordexp_jax.data import counting as C
    from coordexp_jax.data.tokenizer import load_tokenizer
    from coordexp_jax.train import build
    from coordexp_jax.train.counting_objective import CountingObjective

    ids = token_ids(cfg)
    mc = model_config(cfg, ids)
    make_model, materialize = make_model_fn(cfg, mc, ids)
    pcfg = build.prompt_config(cfg, mc)
    tdir = tokenizer_dir(cfg)
    train_recs, val_recs = counting_records(cfg)
    scfg = sequential_config(cfg)
    sampler = C.CountingSampler(train_recs, scfg, seed=cfg.data.seed)
    encoder = CountingEncoder(load_tokenizer(tdir), ids, pcfg, mc,
                              num_candidates=max(sampler.max_objects, 1) if scfg.target == "set" else 0)
    if sampler.report.counts:
        log.warning("counting records: %s", sampler.report.one_line())
    B = build.per_process_batch(cfg.data.batch_size)
    objective = CountingObjective.from_config(cfg)
    if cfg.counting.point_tokens:  # heads and point tokens trained together on the same images
        from coordexp_jax.data.prompts import Collator, SampleEncoder
        from coordexp_jax.train.counting_objective import CountingWithPointsObjective
        from coordexp_jax.train.objective import Stage1Objective

        data_iter = CountingWithPointsBatches(sampler, encoder, SampleEncoder(pcfg, tokenizer=encoder.tok),
                                              Collator(pcfg, ids, mc), B, seed=cfg.data.seed)
        objective = CountingWithPointsObjective(Stage1Objective.from_config(cfg.loss, ids.coord_start,
                                                                            mc.vocab_size), objective)
    else:
        data_iter = CountingBatches(sampler, encoder, B, seed=cfg.data.seed)
    train_counts = [it[0] for it in sampler.items]
    mean_count = float(np.mean([C.object_geometry(r)[0].shape[0] for r in train_counts])) if train_counts else 0.0
    return build.Components(
        make_model=make_model, objective=objective, data_iter=data_iter,
        vocab_size=mc.padded_vocab_size, coord_start=ids.coord_start, materialize=materialize, model_config=mc,
        token_ids=ids, tokenizer_dir=tdir,
        extra={"prompt_config": pcfg, "encoder": encoder, "val_records": val_recs[:cfg.data.num_eval],
               "sequential_config": scfg, "train_mean_count": mean_count})


# ------------------------------------------------------------------------------------------------ inference
def make_point_fn(graphdef):
    """Jitted `(state, batch) -> [B, 2]` heads' prediction (prefill only: one forward of the prompt, the heads at
    `<x>`/`<y>`); `state` = the model's `nnx.split` state. Compiles once per batch shape."""
    from coordexp_jax.model.regression import predict_points

    @jax.jit
    def fn(state, batch):
        return predict_points(nnx.merge(graphdef, state), batch)

    return fn


def make_predict_next(model, encoder: CountingEncoder, system: str | None = None, point_fn=None):
    """`predict_next(marked_image, prompt) -> (x, y)` in [-1, 1] for `counting.count_sequentially`: the marked
    image is re-encoded each call, one jitted forward (`make_point_fn`). `point_fn` reuses a compiled function
    (pass `(fn, state)` made from the same graphdef)."""
    if point_fn is None:
        graphdef, state = nnx.split(model)
        fn = make_point_fn(graphdef)
    else:
        fn, state = point_fn

    def predict_next(marked_image, prompt):
        batch = encoder([marked_image], [system], [prompt])
        return tuple(float(v) for v in np.asarray(fn(state, {k: jnp.asarray(v) for k, v in batch.items()}))[0])

    return predict_next


def predict_counting(model, image: np.ndarray, class_name: str, encoder: CountingEncoder, scfg=None, *,
                     max_count: int = 16, point_fn=None):
    """Counts `class_name` in `image` (uint8 `[H, W, 3]`) with a model carrying regression heads: the sequential
    loop of `coordexp_jax.counting.count_sequentially` (mark, re-encode, predict; stop on done / repeat /
    `max_count`). Returns its `CountingResult` (points in pixels of `image`). `scfg`: the
    `SequentialCountingConfig` the model was trained with (default: the seed's). Draw the numbered picture with
    `counting.draw_counting_result(image, result.points, caption=result.last_prompt)`."""
    from coordexp_jax import counting
    from coordexp_jax.data import counting as C

    scfg = scfg or C.SequentialCountingConfig()
    system = C.counting_system_prompt(class_name, scfg)
    pn = make_predict_next(model, encoder, system, point_fn)
    return counting.count_sequentially(np.asarray(image), class_name, pn, scfg, max_count)


def counting_run_config(checkpoint: str):
    """The resolved config (`ml_collections.ConfigDict`) of the counting run that wrote `checkpoint` (its
    `config.json` beside a run's `final_model/`, with `train.kind` 'counting_regression'), or None (an export or a
    copied model directory has none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if not os.path.isfile(path):
        return None
    import ml_collections

    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("train", {}).get("kind") != "counting_regression":
        return None
    return ml_collections.ConfigDict(raw)


def run_class_name(run) -> str | None:
    """The class a counting run counted: the synthetic set's (`SYNTHETIC_CLASS`) for `data.kind` 'synthetic', else
    the single class of its training records (`data.path`) when they are readable and name one; None otherwise."""
    if run is None:
        return None
    if run.data.kind == "synthetic":
        return SYNTHETIC_CLASS
    from coordexp_jax.data import counting as C, records as R

    import itertools

    try:
        recs = list(itertools.islice(R.iter_jsonl(run.data.path), 1000))
    except (CoordExpError, OSError, ValueError):
        return None
    names = set()
    for r in recs:
        try:
            names.add(C.counting_class(r))
        except (CoordExpError, ValueError):
            continue
    return names.pop() if len(names) == 1 else None


def load_counting_model(checkpoint: str, tokenizer_dir_: str | None = None, *, image_size: int | None = None,
                        dtype=None):
    """(model with heads, CountingEncoder, SequentialCountingConfig) from a checkpoint (ours or an HF export with
    `regression_heads.*`) for `predict_counting`. The image settings come from the checkpoint's
    `preprocessing.json` when present (`image_size`: the longest side, default 128); the counting prompt and order
    from the training run's resolved config (`config.json` beside a run's `final_model`), else the seed's.
    Raises WeightsError when the checkpoint has no heads."""
    from coordexp_jax.data.image import ImageConfig
    from coordexp_jax.data.prompts import PromptConfig
    from coordexp_jax.data.tokenizer import load_tokenizer, token_ids_from_tokenizer
    from coordexp_jax.model.regression import heads_of
    from coordexp_jax.weights.checkpoint import load_checkpoint
    from coordexp_jax.weights.names import WeightsError

    mc, model = load_checkpoint(checkpoint, dtype)
    if heads_of(model) is None:
        raise WeightsError(f"{checkpoint}: no regression heads (regression_heads.json); train it with "
                           f"train.kind='counting_regression'")
    tdir = tokenizer_dir_ or (checkpoint if os.path.isfile(os.path.join(checkpoint, "tokenizer.json"))
                              else SMALL_XY_TOKENIZER_DIR)
    tok = load_tokenizer(tdir)
    ids = token_ids_from_tokenizer(tok, require_coords=False, name=tdir)
    px = None
    pre = os.path.join(checkpoint, "preprocessing.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            px = json.load(f).get("max_pixels")
    px = px or (image_size or 128) ** 2
    v = mc.vision
    image = ImageConfig(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                        temporal_patch_size=v.temporal_patch_size, min_pixels=min(px, 32 * 32 * 4), max_pixels=px)
    pcfg = PromptConfig(image=image, text_bucket="pow2", max_text_len=1 << 16)
    run = counting_run_config(checkpoint)
    scfg = sequential_config(run) if run is not None else None
    if scfg is None:
        from coordexp_jax.data import counting as C

        scfg = C.SequentialCountingConfig()
    return model, CountingEncoder(tok, ids, pcfg, mc), scfg


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_counting(model, records: Sequence, encoder: CountingEncoder, scfg, *, max_count: int,
                      train_mean_count: float | None = None, pictures_dir: str | None = None, num_pictures: int = 0,
                      point_fn=None) -> tuple[dict, list]:
    """Counts every record (`predict_counting`) and scores it: `mae`, `rmse` (of the number of points), `hit_rate`,
    `mean_point_error_px` (`metrics.sequential_counting_metrics`; boxes where the records have them, else the
    mark radius), `done_rate` (stopped by the done signal), and with `train_mean_count` the MAE of always
    answering the rounded training mean (`baseline_mae`). Writes `num_pictures` side-by-side PNGs and
    `per_image.json` (per record: true and predicted count, the last prompt, the picture; the loop's MetricsWriter
    sends the worst pictures with their captions to TensorBoard / W&B) to `pictures_dir`. Returns (metrics,
    per-record CountingResults)."""
    from coordexp_jax import counting, metrics as M
    from coordexp_jax.data import counting as C
    from coordexp_jax.data.image import load_image

    if point_fn is None:
        graphdef, state = nnx.split(model)
        point_fn = (make_point_fn(graphdef), state)
    preds, gts, boxes, radii, results, entries = [], [], [], [], [], []
    for i, r in enumerate(records):
        geo = C.object_geometry(r)
        if geo is None:
            continue
        pts, bxs, cls = geo
        op, ob = C.ordered_geometry(pts, bxs, scfg)
        img = load_image(r.image)
        res = predict_counting(model, img, cls, encoder, scfg, max_count=max_count, point_fn=point_fn)
        results.append(res)
        preds.append(res.points)
        gts.append(op)
        boxes.append(ob)
        radii.append(counting.mark_radius(r.height, r.width, max_count, scfg))
        entry = {"index": i, "image": r.image, "n_gt": len(op), "n_pred": res.count, "prompt": res.last_prompt,
                 "answer": f"{res.count} points, stopped: {res.done_reason}"}
        if pictures_dir is not None and i < num_pictures:
            from PIL import Image

            os.makedirs(pictures_dir, exist_ok=True)
            pic = counting.draw_counting_result(img, res.points, op, counting.result_caption(res, len(op)),
                                                gt_boxes=ob)
            entry["picture"] = f"count_{i:03d}.png"
            Image.fromarray(pic).save(os.path.join(pictures_dir, entry["picture"]))
        entries.append(entry)
    if pictures_dir is not None:
        from coordexp_jax.train.metrics_log import PER_IMAGE_FILE

        os.makedirs(pictures_dir, exist_ok=True)
        with open(os.path.join(pictures_dir, PER_IMAGE_FILE), "w") as f:  # the MetricsWriter's pictures (worst first)
            json.dump(entries, f, indent=1)
    out = M.sequential_counting_metrics(preds, gts, boxes, radii)
    out["done_rate"] = float(np.mean([r.done_reason == "done" for r in results])) if results else 0.0
    if train_mean_count is not None and gts:
        out["baseline_mae"] = M.counting_errors([round(train_mean_count)] * len(gts), [len(g) for g in gts])["mae"]
    return {k: float(v) for k, v in out.items()}, results


def counting_eval_hook(cfg, comps):
    """A loop eval hook `(model, step, workdir) -> metrics` (`evaluate_counting` of the held-out records;
    pictures under `workdir/eval/step_<N>/`); None without held-out records or with `eval.num_images` 0."""
    recs = list(comps.extra.get("val_records") or [])[:cfg.eval.num_images]
    if not recs:
        return None
    encoder, scfg = comps.extra["encoder"], comps.extra["sequential_config"]
    # at least the pictures the MetricsWriter sends to TensorBoard / W&B (as the detection hook does)
    n_log = cfg.log.num_pictures if (cfg.train.tensorboard or cfg.log.wandb.project) else 0
    n_pic = len(recs) if cfg.eval.num_pictures == 0 else max(cfg.eval.num_pictures, n_log)  # 0: every image
    box: dict = {}
    t0 = time.time()

    def hook(model, step, workdir):
        graphdef, state = nnx.split(model)
        if box.get("graphdef") != graphdef:
            box["graphdef"], box["fn"] = graphdef, make_point_fn(graphdef)
        res, _ = evaluate_counting(model, recs, encoder, scfg, max_count=cfg.counting.max_count,
                                   train_mean_count=comps.extra.get("train_mean_count"),
                                   pictures_dir=os.path.join(workdir, "eval", f"step_{step}"),
                                   num_pictures=n_pic, point_fn=(box["fn"], state))
        res["minutes"] = (time.time() - t0) / 60
        return res

    return hook


# ------------------------------------------------------------------------------------------------ gradient check
def gradient_norms(graphdef, params, frozen, objective, batch: dict) -> dict:
    """Global gradient norms of the objective's loss on `batch` (one micro-batch, no leading axis) over the
    regression heads (`grad_norm/heads`), the LoRA weights (`grad_norm/lora`, when any) and everything else
    trainable (`grad_norm/other`)."""
    import optax

    from coordexp_jax.train import optim
    from coordexp_jax.train.step import _combine

    def loss_fn(p):
        model = nnx.merge(graphdef, p, frozen)
        return _combine(objective.weights, objective.sums(model, batch), objective.counts(batch))

    g = jax.jit(jax.grad(loss_fn))(params)
    groups: dict[str, list] = {"heads": [], "lora": [], "other": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        p = optim.path_str(path)
        key = "heads" if optim.is_heads_param(p) else "lora" if p.endswith(("lora_a", "lora_b")) else "other"
        groups[key].append(leaf)
    return {f"grad_norm/{k}": float(optax.global_norm(v)) for k, v in groups.items() if v}


def check_gradients(norms: dict, lora: bool) -> None:
    """Raises GradientFlowError when the heads' (or, with `lora`, the LoRA weights') gradient norm is zero or not
    finite."""
    need = ["grad_norm/heads"] + (["grad_norm/lora"] if lora else [])
    for k in need:
        v = norms.get(k)
        if v is None or not np.isfinite(v) or v == 0.0:
            what = k.split("/")[1]
            raise GradientFlowError(f"first step: the gradient on the {what} is {v} ({norms}); they would not train "
                                    f"(are they trainable? optim.heads.freeze / lora.*)")


def first_step_check(cfg):
    """The loop's first-step hook `(graphdef, state, batch) -> metrics`: `gradient_norms` of the first micro-batch,
    logged, then `check_gradients`."""

    def check(graphdef, state, batch, objective):
        micro = jax.tree.map(lambda x: x[0], batch)
        norms = gradient_norms(graphdef, state.params, state.frozen, objective, micro)
        log.info("first step gradient norms: %s", {k: f"{v:.3g}" for k, v in norms.items()})
        check_gradients(norms, bool(cfg.lora.enabled))
        return norms

    return check


def prepare(cfg, components=None, eval_hook=None) -> tuple[Any, Any]:
    """(components, eval hook) of a counting run for `loop.train`: `build_components(cfg)` and `counting_eval_hook`
    where the caller gave none; the first-step gradient check is registered in `components.extra`."""
    comps = components if components is not None else build_components(cfg)
    if cfg.counting.grad_check:
        comps.extra.setdefault("first_step_check", first_step_check(cfg))
    hook = eval_hook if eval_hook is not None else counting_eval_hook(cfg, comps)
    return comps, hook


__all__ = ["prepare", "build_components", "CountingEncoder", "CountingBatches", "CountingWithPointsBatches",
           "make_model_fn", "make_point_fn",
           "make_predict_next", "predict_counting", "load_counting_model", "counting_run_config", "run_class_name",
           "evaluate_counting", "counting_eval_hook", "scale_attention_logits", "gradient_norms", "check_gradients", "first_step_check",
           "GradientFlowError", "token_ids", "tokenizer_dir", "sequential_config", "synthetic_config",
           "counting_records"]
