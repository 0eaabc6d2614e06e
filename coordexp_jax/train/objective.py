"""The Stage-1 objective of CoordExp (`../shared/reference/coordexp_method.md` §5) on the Qwen3-VL model.

total = ce + sum_t w_t * term_t over coord_ce, soft_ce, w1, gate, text_gate, l1, giou, smooth_l1, ciou (weights from
`config.loss`). Each term is averaged over its own count: text tokens (ce, text_gate), coordinate tokens (coord_ce,
soft_ce, w1, gate) or valid boxes (l1, giou, smooth_l1, ciou). `counts` reads them from the batch masks, so the train
step can sum them over micro-batches and devices before dividing (step.py). Terms with weight 0 are not computed,
except ce, which is always reported.

The geometry terms use the expectation box b_hat at `box_pos` (softmax over the 1000 coordinate logits at tau).
Vocabulary statistics (ce, gate, text_gate) come from full logits, or, with `loss.ce_chunk > 0`, from
`chunked_vocab_stats` so that `[B, S, V]` logits are never materialised.

Without coordinate tokens (`coord_start = -1`: protocol `qwen_text` on a released, unexpanded tokenizer) there are
no coordinate logits: only `ce` applies (coordinates are ordinary text targets), and a config that weights a
coordinate, gate or box term is refused (`Stage1Objective.from_config`, ConfigError naming the key).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from coordexp_jax.coord import expectation as cexp, losses as L

TERMS = ("ce", "coord_ce", "soft_ce", "w1", "gate", "text_gate", "l1", "giou", "smooth_l1", "ciou")
TEXT_TERMS = ("ce", "text_gate")
COORD_TERMS = ("coord_ce", "soft_ce", "w1", "gate")
BOX_TERMS = ("l1", "giou", "smooth_l1", "ciou")
VISION_KEYS = ("pixel_values", "vision_segment_ids", "vision_pos_taps", "vision_pos_weights", "vision_rope_rc",
               "visual_index")
# token geometry for spatial linking (model/inputs.py), passed on when the batch has it
LINK_VISION_KEYS = ("vision_token_rect", "visual_image")
LINK_KEYS = ("pos", "boxes", "image", "kind")  # batch keys link_<name> (model/spatial_linking.py)


def vision_inputs(batch: dict) -> dict | None:
    """The model's `vision` dict from a batch (None for a text-only batch)."""
    if "pixel_values" not in batch:
        return None
    return {k: batch[k] for k in VISION_KEYS + tuple(k for k in LINK_VISION_KEYS if k in batch)}


def links_of(batch: dict, rng=None) -> dict | None:
    """The model's spatial-linking `links` dict `{pos, boxes, image, kind}` from the flat batch keys `link_pos`,
    `link_boxes`, `link_image`, `link_kind` (or a `batch['links']` dict); None when the batch has none. `rng` (a
    PRNG key) is added as `links['rng']`: the module's attention dropout runs only when it is given (training)."""
    if isinstance(batch.get("links"), dict):
        links = {k: batch["links"][k] for k in LINK_KEYS if k in batch["links"]}
    elif "link_pos" in batch:
        links = {k: batch[f"link_{k}"] for k in LINK_KEYS if f"link_{k}" in batch}
    else:
        return None
    if rng is not None:
        links["rng"] = rng
    return links


@dataclasses.dataclass(frozen=True)
class Stage1Objective:
    """`weights`: term -> weight (ce always present); coord_start: id of <|coord_0|>; vocab_size: the real vocabulary
    (padded rows excluded); tau, sigma, truncate: §5; ce_chunk: sequence chunk of the vocabulary statistics (0 =
    materialise the logits); coord_positions: K > 0 scores coord_ce/soft_ce/w1 at the first K coordinate targets
    of each row only (gathered before the coordinate head; the loop warns when a row has more), 0 = all.
    coord_start = -1: no coordinate tokens, `weights` may hold `ce` only (ValueError otherwise)."""

    weights: dict
    coord_start: int
    vocab_size: int
    tau: float = 1.0
    sigma: float = 1.0
    truncate: float = 8.0
    ce_chunk: int = 0
    coord_positions: int = 0

    def __post_init__(self):
        extra = sorted(t for t in self.weights if t != "ce")
        if self.coord_start < 0 and extra:
            raise ValueError(f"Stage1Objective: terms {extra} need coordinate tokens (coord_start is -1)")

    @classmethod
    def from_config(cls, loss_cfg, coord_start: int, vocab_size: int) -> "Stage1Objective":
        """From `config.loss`. Raises ConfigError naming the first `loss.<term>` with a weight > 0 that needs
        coordinate tokens when there are none (`coord_start < 0`)."""
        w = {t: float(loss_cfg[t]) for t in TERMS if t == "ce" or float(loss_cfg[t]) > 0}
        if coord_start < 0:
            from coordexp_jax.train.config import ConfigError

            extra = [t for t in TERMS if t in w and t != "ce"]
            if extra:
                raise ConfigError(f"config key 'loss.{extra[0]}' = {w[extra[0]]}: the tokenizer has no coordinate "
                                  f"tokens (protocol qwen_text writes coordinates as text), so only loss.ce applies; "
                                  f"set {', '.join('loss.' + t for t in extra)} to 0")
        return cls(weights=w, coord_start=int(coord_start), vocab_size=int(vocab_size), tau=float(loss_cfg.tau),
                   sigma=float(loss_cfg.sigma), truncate=float(loss_cfg.truncate), ce_chunk=int(loss_cfg.ce_chunk),
                   coord_positions=int(loss_cfg.coord_positions))

    def counts(self, batch: dict) -> dict:
        """Token/box counts of each active term over the whole batch (any leading axes)."""
        lm = batch["loss_mask"].astype(jnp.float32)
        cm = batch["coord_mask"].astype(jnp.float32) * (lm > 0)
        per_row = jnp.sum(cm, axis=-1)
        scored = jnp.minimum(per_row, self.coord_positions) if self.coord_positions > 0 else per_row
        n = {"text": jnp.sum(lm * (1.0 - cm)), "coord": jnp.sum(cm), "coord_slots": jnp.sum(scored),
             "box": jnp.sum(batch["box_valid"].astype(jnp.float32))}
        kind = {**{t: "text" for t in TEXT_TERMS}, **{t: "coord_slots" for t in ("coord_ce", "soft_ce", "w1")},
                "gate": "coord", **{t: "box" for t in BOX_TERMS}}
        return {t: n[kind[t]] for t in self.weights}

    def sums(self, model: nnx.Module, batch: dict, rng=None) -> dict:
        """Summed loss of each active term on one micro-batch `[B, ...]` (float32 scalars). `rng`: dropout key of
        the spatial-linking module (None: deterministic)."""
        w = self.weights
        hidden = model(batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch),
                       links_of(batch, rng))
        targets, lm = batch["targets"], batch["loss_mask"]
        cm = batch["coord_mask"].astype(jnp.float32) * (lm > 0)
        need_gates = "gate" in w or "text_gate" in w
        cs = self.coord_start if need_gates else None
        if self.ce_chunk > 0:
            emb = output_embedding(model)
            stats = L.chunked_vocab_stats(hidden, emb, targets, cs, self.tau, self.ce_chunk, self.vocab_size,
                                          dtype=getattr(model, "dtype", None))  # bf16 matmul, f32 sums
        else:
            stats = L.vocab_stats(model.lm_logits(hidden), targets, cs, self.tau, self.vocab_size)
        out = {"ce": L.ce_from_stats(stats, lm, cm)[0]}
        if "gate" in w:
            out["gate"] = L.gate_from_stats(stats, cm)[0]
        if "text_gate" in w:
            out["text_gate"] = L.text_gate_from_stats(stats, lm, cm)[0]
        if any(t in w for t in ("coord_ce", "soft_ce", "w1")):
            # Coordinate logits only where they are scored, never the full vocabulary: at every position, or (with
            # `coord_positions` = K > 0) at the first K coordinate targets of each row, gathered first.
            h, bins, m = hidden, targets - self.coord_start, cm
            if self.coord_positions > 0:
                idx = jnp.argsort(cm <= 0, axis=1, stable=True)[:, : self.coord_positions]  # [B, K] targets first
                h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
                bins = jnp.take_along_axis(bins, idx, axis=1)
                m = jnp.take_along_axis(cm, idx, axis=1)
            s = model.coord_logits(h, self.coord_start)  # [B, S or K, 1000] float32
            if "coord_ce" in w:
                out["coord_ce"] = L.coord_ce(s, bins, m)[0]
            if "soft_ce" in w:
                out["soft_ce"] = L.soft_ce(s, bins, m, self.tau, self.sigma, self.truncate)[0]
            if "w1" in w:
                out["w1"] = L.w1(s, bins, m, self.tau, self.sigma, self.truncate)[0]
        if any(t in w for t in BOX_TERMS):
            # Gather the hidden states first: only B*M*4 rows go through the coordinate head.
            hb = cexp.gather_positions(hidden, batch["box_pos"])  # [B, M, 4, H]
            pred = cexp.decode(model.coord_logits(hb, self.coord_start), "exp", self.tau)  # [B, M, 4]
            tgt, valid = batch["box_target"], batch["box_valid"]
            if "l1" in w:
                out["l1"] = L.l1(pred, tgt, valid)[0]
            if "giou" in w:
                out["giou"] = L.giou(pred, tgt, valid)[0]
            if "smooth_l1" in w:
                out["smooth_l1"] = L.smooth_l1(pred, tgt, valid)[0]
            if "ciou" in w:
                out["ciou"] = L.ciou(pred, tgt, valid)[0]
        return {k: v.astype(jnp.float32) for k, v in out.items()}


def output_embedding(model) -> jax.Array:
    """The output projection as `[V_padded, H]` (the tied embedding, or lm_head's kernel transposed)."""
    if getattr(model, "lm_head", None) is None:
        return model.language_model.embed_tokens.embedding[...]
    return model.lm_head.kernel[...].T
