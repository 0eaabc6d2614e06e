"""Stage-2 rollout training ("EM-ish", coordexp_method.md §7), built on the ordinary training batch.

A Stage-2 step takes the same collated batch as a Stage-1 step (right-padded rows: prompt + ground-truth answer)
and replaces every row's answer by one built from the model's own rollout:

1. the prompts are rolled out without gradient (greedy by default) with the jitted sampler;
2. the rollout is parsed (objects with their emitted bins) and the ground truth is read back from the row's own
   answer tokens (descs) and `box_target` (continuous boxes);
3. predictions are matched to the ground truth (Hungarian by default, Sinkhorn optional; L1 + GIoU cost, a
   description mismatch costs `desc_weight`, pairs below the IoU gate are not accepted);
4. the new answer is the *canonicalised rollout*: the rollout's well-formed objects re-serialised in rollout order
   with the bins the model emitted (so the coordinate context is exactly the model's own), then the missed (FN)
   ground-truth objects appended, then the closing and `<|im_end|>`;
5. the targets: matched objects are supervised towards their ground truth (coordinate targets are the matched
   ground-truth bins, so CE/soft-CE/W1 pull the distribution there, and the expectation box at those positions
   gets the geometry loss against the matched ground-truth box); false-positive objects (and the separator that
   opens them) get no loss at all (datasets are incompletely labelled); FN objects are ordinary teacher-forced
   targets with their boxes; the closing and `<|im_end|>` are always supervised.

The result is a batch in the training-batch contract (docs/architecture.md) with the same static shapes as the
input, so the Stage-1 train step (compiled once) runs it. A row whose rollout does not parse cleanly (dropped
fragments or an unclosed answer) or whose new answer would not fit keeps its Stage-1 answer; these fallbacks are
counted by reason. Text re-serialisation canonicalises only whitespace/tokenisation of the model's text; the
coordinate tokens are exactly the emitted ones.

Steps are routed deterministically: step s is a rollout step iff floor((s+1)ρ) > floor(sρ).

Stage-2 needs a coordinate-token protocol (coordjson, tags): its targets are coordinate tokens. `Stage2Runner`
refuses `qwen_text` (coordinates as text) with a ConfigError naming `stage2.ratio`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math

import jax
import numpy as np

from coordexp_jax.coord.boxes import pairwise_iou_exact

from coordexp_jax import metrics as M
from coordexp_jax.coord import codec, matching, protocols


def is_rollout_step(step: int, ratio: float) -> bool:
    """Deterministic routing: step s is a Stage-2 step iff floor((s+1)ρ) > floor(sρ)."""
    return math.floor((step + 1) * ratio) > math.floor(step * ratio)


@dataclasses.dataclass(frozen=True)
class Stage2Config:
    ratio: float = 0.05  # fraction of steps that are rollout steps
    method: str = "hungarian"  # or "sinkhorn"
    iou_threshold: float = 0.5  # matched pairs below this IoU are not accepted
    l1_weight: float = 1.0
    giou_weight: float = 1.0
    desc_weight: float = 8.0  # cost of a description mismatch (> any box cost: mismatched descs never match)
    use_expectation: bool = True  # match with the rollout's expectation boxes (else the emitted bins)

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"stage2.ratio must be in [0, 1], got {self.ratio}")
        if self.method not in matching.METHODS:
            raise ValueError(f"stage2.method must be one of {matching.METHODS}, got {self.method!r}")


def prompt_lengths(batch: dict) -> np.ndarray:
    """Prompt length of every row of a right-padded training batch: one past the first supervised position
    (the logits at position P-1 predict the first answer token)."""
    lm = np.asarray(batch["loss_mask"]) > 0
    if not lm.any(axis=1).all():
        raise ValueError(f"rows {np.where(~lm.any(axis=1))[0].tolist()} have no supervised answer")
    return lm.argmax(axis=1) + 1


def left_padded_prompts(batch: dict, pad_id: int) -> dict:
    """The prompts of a right-padded training batch as a left-padded rollout batch (same vision slots)."""
    plen = prompt_lengths(batch)
    B, S = batch["input_ids"].shape
    L = int(plen.max())
    ids = np.full((B, L), pad_id, np.int32)
    am = np.zeros((B, L), np.int32)
    pos = np.zeros((3, B, L), np.int32)
    vi = np.full((B, L), -1, np.int32)
    for b, p in enumerate(plen):
        ids[b, L - p:] = batch["input_ids"][b, :p]
        am[b, L - p:] = 1
        pos[:, b, L - p:] = batch["positions"][:, b, :p]
        vi[b, L - p:] = batch["visual_index"][b, :p]
    out = {k: v for k, v in batch.items() if k.startswith("vision_") or k == "pixel_values"}
    out.update(input_ids=ids, attention_mask=am, positions=pos, visual_index=vi,
               rope_deltas=np.asarray(batch["rope_deltas"]))
    return out


def _gt_objects(batch: dict, b: int, plen: int, tokenizer, token_ids, protocol: str):
    """Ground truth of row b: descs and normalised boxes `[M, 4]` float64 read back from its own answer tokens
    (`ParseResult.boxes()`: k / 999 for coordinate tokens, the exact q / 1000 for `qwen_text`), replaced by the
    continuous `box_target` where the row has box slots."""
    n = int(np.asarray(batch["attention_mask"])[b].sum())
    parsed = protocols.parse(list(np.asarray(batch["input_ids"])[b, plen:n]), tokenizer, token_ids, protocol)
    boxes = parsed.boxes()
    valid = np.asarray(batch["box_valid"])[b]
    m = min(int(valid.sum()), len(boxes))
    boxes[:m] = np.asarray(batch["box_target"])[b, :m]  # exact continuous boxes where slots exist
    return parsed.descs(), boxes


@dataclasses.dataclass
class RowPlan:
    """What the new answer of one row is made of (host-side, for tests and metrics)."""

    objects: list  # AnswerObject in emitted order: rollout objects, then FN ground truth
    is_fp: np.ndarray  # [n] bool, per emitted object
    gt_index: np.ndarray  # [n] int, matched / appended ground-truth index (-1 for FP)
    num_rollout: int


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _jitted_match(method: str, l1_weight: float, giou_weight: float, desc_weight: float, iou_threshold: float):
    return jax.jit(functools.partial(matching.match_batch, method=method, l1_weight=l1_weight,
                                     giou_weight=giou_weight, desc_weight=desc_weight, iou_threshold=iou_threshold))


def match_rows(rows: list[tuple], cfg: Stage2Config) -> list[np.ndarray]:
    """Matches every row at once: rows of (pred_descs, pred_boxes [n,4], gt_descs, gt_boxes [m,4]) are padded to
    power-of-two (N, M) buckets and matched by one jitted `matching.match_batch` (a handful of compiles per run,
    not one per row shape). Returns pred_to_gt [n] per row (-1 = unmatched)."""
    if not rows:
        return []
    B = len(rows)
    N = _pow2(max(max(len(r[0]) for r in rows), 1))
    M = _pow2(max(max(len(r[2]) for r in rows), 1))
    pred = np.zeros((B, N, 4), np.float32)
    gt = np.zeros((B, M, 4), np.float32)
    pv = np.zeros((B, N), bool)
    gv = np.zeros((B, M), bool)
    dc = np.zeros((B, N, M), np.float32)
    for b, (pd, pb, gd, gb) in enumerate(rows):
        n, m = len(pd), len(gd)
        pred[b, :n], gt[b, :m], pv[b, :n], gv[b, :m] = np.asarray(pb).reshape(n, 4), np.asarray(gb).reshape(m, 4), 1, 1
        if n and m:
            dc[b, :n, :m] = matching.desc_mismatch(list(pd), list(gd))
    fn = _jitted_match(cfg.method, cfg.l1_weight, cfg.giou_weight, cfg.desc_weight, cfg.iou_threshold)
    p2g = np.asarray(fn(pred, gt, pv, gv, dc).pred_to_gt)
    return [p2g[b, :len(r[0])].astype(np.int64) for b, r in enumerate(rows)]


def plan_row(pred_descs, pred_bins, pred_boxes, gt_descs, gt_boxes, p2g) -> tuple[RowPlan, dict]:
    """Decides the new answer's objects of one row from its matching `p2g [n]` (`match_rows`)."""
    n, m = len(pred_descs), len(gt_descs)
    p2g = np.asarray(p2g, np.int64).reshape(n)
    matched_gt = set(int(j) for j in p2g if j >= 0)
    fn = [j for j in range(m) if j not in matched_gt]
    objs = [protocols.AnswerObject(d, bins=tuple(int(v) for v in bb)) for d, bb in zip(pred_descs, pred_bins)]
    objs += [protocols.AnswerObject(gt_descs[j], box=tuple(float(v) for v in gt_boxes[j])) for j in fn]
    gt_index = np.concatenate([p2g, np.asarray(fn, np.int64)])
    is_fp = np.concatenate([p2g < 0, np.zeros(len(fn), bool)])
    ious = [pairwise_iou_exact(np.array([pred_boxes[i]]), np.array([gt_boxes[p2g[i]]]))[0, 0]
            for i in range(n) if p2g[i] >= 0]
    stats = {"matched": len(matched_gt), "fp": int((p2g < 0).sum()), "fn": len(fn), "iou_sum": float(np.sum(ious))}
    return RowPlan(objs, is_fp, gt_index, n), stats


def build_row(plan: RowPlan, gt_boxes, gt_bins, prompt_ids, tokenizer, token_ids, protocol: str, mode: str,
              max_objects: int) -> dict:
    """The new row: ids, targets, loss mask and box slots for a `RowPlan` (positions relative to the row).
    Coordinate-token protocols only (raises ValueError for `qwen_text`: its targets would be text)."""
    if not protocols.uses_coord_tokens(protocol):
        raise ValueError(f"Stage-2 rows need a coordinate-token protocol {protocols.COORD_TOKEN_PROTOCOLS}, "
                         f"got {protocol!r}")
    s = protocols.serialize(plan.objects, tokenizer, token_ids, protocol, order="given", mode=mode)
    P = len(prompt_ids)
    ids = np.asarray(list(prompt_ids) + list(s.ids) + [token_ids.eos], np.int32)
    n = len(ids)
    targets = np.full(n, token_ids.pad, np.int32)
    targets[:-1] = ids[1:]
    loss_mask = np.zeros(n, np.float32)
    loss_mask[P - 1:n - 1] = 1.0
    box_pos, box_target = [], []
    for k, obj in enumerate(plan.objects):
        cpos = P + s.coord_positions[k]  # token indices of the 4 coordinate tokens
        if plan.is_fp[k]:
            # No loss on the object's tokens nor on the separator that opened it.
            start = P + (s.spans[k - 1, 1] if k > 0 else s.spans[k, 0])
            loss_mask[start - 1:P + s.spans[k, 1] - 1] = 0.0
            continue
        j = plan.gt_index[k]
        if k < plan.num_rollout:  # matched: the targets at its coordinates are the ground-truth bins
            targets[cpos - 1] = token_ids.coord_id(np.asarray(gt_bins[j], np.int32))
        if len(box_pos) < max_objects:
            box_pos.append(cpos - 1)
            box_target.append(np.asarray(gt_boxes[j], np.float32))
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask,
            "box_pos": np.asarray(box_pos, np.int32).reshape(-1, 4),
            "box_target": np.asarray(box_target, np.float32).reshape(-1, 4)}


def rollout_batch(batch: dict, rollout, tokenizer, token_ids, cfg: Stage2Config, *, protocol: str = "coordjson",
                  mode: str = "continuous") -> tuple[dict, dict]:
    """Builds the Stage-2 batch from a Stage-1 batch and the rollout of its prompts (`rollout.sampler.Rollout`,
    rows in batch order). Returns (new batch with the same keys and shapes, metrics)."""
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    B, S = out["input_ids"].shape
    Mslots = out["box_pos"].shape[1]
    plen = prompt_lengths(batch)
    fallback: collections.Counter = collections.Counter()
    totals = collections.Counter()
    todo = []  # (row, parsed, gt descs, gt boxes, pred boxes) of the rows whose rollout parsed cleanly
    for b in range(B):
        ro_ids = rollout.row(b)
        parsed = protocols.parse(ro_ids, tokenizer, token_ids, protocol)
        totals["rows"] += 1
        totals["pred"] += len(parsed.objects)
        totals["dup"] += M.duplicate_count([M.PredObject(o.desc, tuple(o.box)) for o in parsed.objects])
        if parsed.num_dropped or not parsed.closed:
            fallback["malformed"] += 1
            continue
        totals["parsed"] += 1
        gt_descs, gt_boxes = _gt_objects(batch, b, plen[b], tokenizer, token_ids, protocol)
        pred_boxes = parsed.boxes()
        if cfg.use_expectation:
            exp_boxes = np.asarray(rollout.coord_expectation[b])[parsed.positions()].reshape(-1, 4)
            pred_boxes = np.where(np.isfinite(exp_boxes), exp_boxes, pred_boxes)
        todo.append((b, parsed, gt_descs, gt_boxes, pred_boxes))
    matches = match_rows([(t[1].descs(), t[4], t[2], t[3]) for t in todo], cfg)
    for (b, parsed, gt_descs, gt_boxes, pred_boxes), p2g in zip(todo, matches):
        plan, st = plan_row(parsed.descs(), parsed.bins(), pred_boxes, gt_descs, gt_boxes, p2g)
        totals.update(st)
        gt_bins = codec.box_to_bins(np.asarray(gt_boxes, np.float64).reshape(-1, 4), mode)
        prompt = out["input_ids"][b, :plen[b]]
        row = build_row(plan, gt_boxes, gt_bins, prompt, tokenizer, token_ids, protocol, mode, Mslots)
        # Too long for the row: drop false positives from the end first (they carry no loss, only context).
        while len(row["input_ids"]) > S and plan.is_fp.any():
            k = int(np.nonzero(plan.is_fp)[0][-1])
            plan = RowPlan([o for i, o in enumerate(plan.objects) if i != k], np.delete(plan.is_fp, k),
                           np.delete(plan.gt_index, k), plan.num_rollout - 1)
            totals["fp_dropped_to_fit"] += 1
            row = build_row(plan, gt_boxes, gt_bins, prompt, tokenizer, token_ids, protocol, mode, Mslots)
        n = len(row["input_ids"])
        if n > S:
            fallback["too_long"] += 1
            continue
        delta = int(np.asarray(batch["rope_deltas"])[b])
        P = int(plen[b])
        out["input_ids"][b] = token_ids.pad
        out["input_ids"][b, :n] = row["input_ids"]
        out["attention_mask"][b] = 0
        out["attention_mask"][b, :n] = 1
        out["targets"][b] = token_ids.pad
        out["targets"][b, :n] = row["targets"]
        out["loss_mask"][b] = 0
        out["loss_mask"][b, :n] = row["loss_mask"]
        # Text after the prompt continues at t + rope_delta on all three M-RoPE axes; pads are 0.
        out["positions"][:, b, P:] = 0
        out["positions"][:, b, P:n] = np.arange(P, n) + delta
        out["visual_index"][b, P:] = -1
        m = len(row["box_pos"])
        out["box_pos"][b] = 0
        out["box_target"][b] = 0
        out["box_valid"][b] = False
        out["box_pos"][b, :m], out["box_target"][b, :m], out["box_valid"][b, :m] = \
            row["box_pos"], row["box_target"], True
        if "num_objects" in out:
            out["num_objects"][b] = int((~plan.is_fp).sum())
        if "coord_mask" in out:
            out["coord_mask"][b] = token_ids.is_coord(out["targets"][b]) & (out["loss_mask"][b] > 0)
    rows = max(totals["rows"], 1)
    metrics = {"stage2/parse_rate": totals["parsed"] / rows,
               "stage2/matched": totals["matched"] / rows, "stage2/fp": totals["fp"] / rows,
               "stage2/fn": totals["fn"] / rows, "stage2/pred": totals["pred"] / rows,
               "stage2/duplicate_rate": totals["dup"] / max(totals["pred"], 1),
               "stage2/mean_iou": totals["iou_sum"] / max(totals["matched"], 1),
               "stage2/fallback_malformed": fallback["malformed"], "stage2/fallback_too_long": fallback["too_long"],
               "stage2/fp_dropped_to_fit": totals["fp_dropped_to_fit"]}
    return out, metrics


def check_protocol(cfg) -> None:
    """Raises ConfigError (one line) when Stage-2 is on (`stage2.ratio > 0`) with a protocol that writes
    coordinates as text (`qwen_text`): the rewritten rows supervise coordinate tokens."""
    from coordexp_jax.train.config import ConfigError

    if float(cfg.stage2.ratio) > 0 and not protocols.uses_coord_tokens(cfg.data.protocol):
        raise ConfigError(f"config key 'stage2.ratio' = {cfg.stage2.ratio}: Stage-2 rollout training needs a "
                          f"coordinate-token protocol {protocols.COORD_TOKEN_PROTOCOLS}, but data.protocol is "
                          f"{cfg.data.protocol!r} (set stage2.ratio = 0)")


class Stage2Runner:
    """Rewrites the micro-batches of rollout steps inside the training loop.

    The rollout uses the current (not EMA) weights: the loop calls `rewrite` after dispatching the previous step,
    so the sampler sees the freshly updated parameters (on-policy). The sampler is compiled once; later calls only
    swap the weights in. Several processes (`jax.distributed`): each process passes its own rows; the rollout runs on
    the global batch-sharded prompts with the global parameters (`rollout/multihost.py:generate_global`, `mesh`
    required), each process matches and rewrites its own rows, and the metrics are averaged over the processes.
    """

    def __init__(self, cfg, comps, graphdef, mesh=None):
        from coordexp_jax.data.tokenizer import load_tokenizer

        check_protocol(cfg)
        s = cfg.stage2
        self.cfg = Stage2Config(ratio=float(s.ratio), method=s.method, iou_threshold=float(s.iou_threshold),
                                l1_weight=float(s.l1_weight), giou_weight=float(s.giou_weight),
                                desc_weight=float(s.desc_weight), use_expectation=bool(s.use_expectation))
        self.max_new_tokens = int(s.max_new_tokens) or int(cfg.eval.max_new_tokens)
        self.graphdef = graphdef
        self.token_ids = comps.token_ids
        self.tokenizer = load_tokenizer(comps.tokenizer_dir)
        pcfg = comps.extra.get("prompt_config")
        self.protocol = cfg.data.protocol
        self.mode = pcfg.pixel_mode if pcfg is not None else "continuous"
        self.sampler = None
        self.mesh = mesh
        vis = getattr(comps.model_config, "vision", None)
        self.merge = int(getattr(vis, "spatial_merge_size", 2))

    def is_rollout_step(self, step: int) -> bool:
        return is_rollout_step(step, self.cfg.ratio)

    def rewrite(self, micro_batches: list[dict], params, frozen) -> tuple[list[dict], dict]:
        import time

        from flax import nnx

        from coordexp_jax.rollout.sampler import Sampler, SamplerConfig

        graphdef, state = nnx.split(nnx.merge(self.graphdef, params, frozen))
        if self.sampler is None:
            self.sampler = Sampler((graphdef, state), self.token_ids, SamplerConfig(max_new_tokens=self.max_new_tokens))
        self.sampler.state = state
        out, tot = [], collections.Counter()
        for b in micro_batches:
            t0 = time.perf_counter()
            if jax.process_count() > 1:  # one SPMD rollout of the global batch, this process's rows back
                from coordexp_jax.rollout.multihost import generate_global

                ro = generate_global(self.sampler, left_padded_prompts(b, self.token_ids.pad), self.mesh,
                                     merge=self.merge)
            else:
                ro = self.sampler.generate(left_padded_prompts(b, self.token_ids.pad))
            t1 = time.perf_counter()
            nb, m = rollout_batch(b, ro, self.tokenizer, self.token_ids, self.cfg, protocol=self.protocol,
                                  mode=self.mode)
            tot.update(m)
            tot["stage2/rollout_s"] += t1 - t0
            tot["stage2/targets_s"] += time.perf_counter() - t1
            out.append(nb)
        n = len(micro_batches)
        summed = ("stage2/fallback", "stage2/fp_dropped")  # counts over the step; the rest are per-row means
        metrics = {k: (v if k.startswith(summed) or k.endswith("_s") else v / n) for k, v in tot.items()}
        if jax.process_count() > 1:
            metrics = _across_processes(metrics, summed)
        return out, metrics


# ratios of sums: averaged over the processes with these per-row means as weights (every process has as many rows)
_RATIO_WEIGHTS = {"stage2/mean_iou": "stage2/matched", "stage2/duplicate_rate": "stage2/pred"}


def _across_processes(metrics: dict, summed: tuple) -> dict:
    """One process's Stage-2 metrics -> those of all processes' rows (every process gets the same dict): counts
    summed, per-row means averaged, ratios of sums weighted (`_RATIO_WEIGHTS`), seconds the slowest process's."""
    from coordexp_jax.rollout.multihost import allgather_floats

    keys = sorted(metrics)
    allv = allgather_floats([metrics[k] for k in keys])
    col = {k: allv[:, i] for i, k in enumerate(keys)}
    out = {}
    for k, v in col.items():
        if k.startswith(summed):
            out[k] = float(v.sum())
        elif k.endswith("_s"):
            out[k] = float(v.max())
        elif k in _RATIO_WEIGHTS and _RATIO_WEIGHTS[k] in col:
            w = col[_RATIO_WEIGHTS[k]]
            out[k] = float((v * w).sum() / w.sum()) if w.sum() > 0 else 0.0
        else:
            out[k] = float(v.mean())
    return out
