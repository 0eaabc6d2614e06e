"""Prompts and tokenisation: a validated record (+ its image) -> the arrays of one sample; batches to static shapes.

Chat format (Qwen; `qwen3vl_spec.md` §4.3)::

    [<|im_start|>system\\n{system}<|im_end|>\\n]
    <|im_start|>user\\n<|vision_start|><|image_pad|> x n<|vision_end|>{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

`n = gh * gw / merge^2` (the image's merged tokens). The answer is written by `coord/protocols.py` (coordjson by
default, tags, or Qwen3-VL's own `qwen_text`): detection lists every object; grounding lists the boxes of the
referring phrase (the objects' desc); counting writes `{"count": N, "points": [...]}` (points, or box centres for
boxed counting records).
A record's `prompt` replaces the instruction verbatim.

Training arrays (docs/architecture.md, "a training batch"): targets are shifted (`targets[t] = input_ids[t+1]`),
`loss_mask` is 1 exactly on the positions whose target is an answer token (the answer's closing and
`<|im_end|>` included), `coord_mask` on those whose target is a coordinate bin, `box_pos[m, j]` the position whose
logits predict coordinate j of object m (in emission order), `box_target` its normalised continuous box.
Objects beyond `max_objects` (M) stay in the answer text (so CE still teaches the full list) but get no box slot.
`qwen_text` answers write coordinates as text, so they get no box slots at all (no coordinate-token losses apply).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import zlib
from collections.abc import Sequence

import numpy as np

from coordexp_jax.errors import CoordExpError
from coordexp_jax.coord import protocols
from coordexp_jax.data import image as image_lib
from coordexp_jax.data.records import Record
from coordexp_jax.data.tokenizer import TokenIds, encode_text, token_ids_from_tokenizer

log = logging.getLogger(__name__)
# Grain runs transforms in threads; the first `transformers` import is not thread-safe (lazy module), so loading
# the tokenizer is serialised.
_LOAD_LOCK = threading.Lock()

DEFAULT_INSTRUCTIONS = {
    ("detection", "coordjson"): "Detect all objects in the image. Answer in JSON.",
    ("detection", "tags"): "Locate every object in the image and output its bounding box.",
    ("grounding", "coordjson"): "Find the object described by the phrase and give its bounding box: {phrase}",
    ("grounding", "tags"): "Find the object described by the phrase and give its bounding box: {phrase}",
    ("counting", "coordjson"): "Count the objects of this category in the image: {category}",
    # qwen_text: worded as Qwen3-VL's own grounding prompts ("... Report bbox coordinates in JSON format."), so a
    # released checkpoint recognises the task
    ("detection", "qwen_text"): "Locate every object in the image. Report bbox coordinates in JSON format.",
    ("grounding", "qwen_text"): ('Locate every object that matches the description "{phrase}" in the image. '
                                 "Report bbox coordinates in JSON format."),
}


class SampleError(CoordExpError, ValueError):
    """A record cannot be turned into a sample (e.g. a grounding record without a phrase); names the record."""


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How records become token sequences and batches.

    `text_bucket`: "pow2" pads each batch to the smallest power of two >= its longest row (at least
    `min_text_len`), an int for one fixed length, or a tuple of lengths (the smallest that fits). `patches_per_slot` (P): fixed, or None for the power-of-two
    bucket (a multiple of 4) of the largest image in the batch. `max_text_len`: longer samples are dropped (logged).
    """

    protocol: str = "coordjson"
    order: str = "sorted"  # "sorted" by (y1, x1), "random" (per-epoch, from Grain's per-element rng), "given"
    system_prompt: str | None = None
    instructions: tuple = ()  # ((task, protocol), template) pairs overriding DEFAULT_INSTRUCTIONS
    max_objects: int = 32
    max_text_len: int = 2048
    min_text_len: int = 64
    text_bucket: str | int | tuple = "pow2"
    patches_per_slot: int | None = None
    pixel_mode: str = "continuous"
    image: image_lib.ImageConfig = image_lib.ImageConfig()

    def __post_init__(self):
        if self.protocol not in protocols.PROTOCOLS:
            raise ValueError(f"PromptConfig.protocol must be one of {protocols.PROTOCOLS}, got {self.protocol!r}")
        if self.order not in protocols.ORDERS:
            raise ValueError(f"PromptConfig.order must be one of {protocols.ORDERS}, got {self.order!r}")
        if self.max_objects < 1:
            raise ValueError(f"PromptConfig.max_objects must be >= 1, got {self.max_objects}")
        tb = self.text_bucket
        if not (tb == "pow2" or (isinstance(tb, int) and tb > 0)
                or (isinstance(tb, tuple) and tb and all(isinstance(b, int) and b > 0 for b in tb))):
            raise ValueError(f"PromptConfig.text_bucket must be 'pow2', a positive int or a tuple of them, got {tb!r}")
        if self.patches_per_slot is not None and self.patches_per_slot % (self.image.merge_size ** 2):
            raise ValueError(f"PromptConfig.patches_per_slot {self.patches_per_slot} must be a multiple of "
                             f"{self.image.merge_size ** 2}")

    def instruction(self, task: str) -> str:
        table = dict(DEFAULT_INSTRUCTIONS)
        table.update(dict(self.instructions))
        key = (task, self.protocol)
        if key not in table:
            raise SampleError(f"no instruction for task {task!r} with protocol {self.protocol!r}"
                              + (" (counting answers are coordjson only)" if task == "counting" else ""))
        return table[key]


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


def bucket_len(n: int, cfg: PromptConfig) -> int:
    """Padded text length of a batch whose longest row has n tokens."""
    if cfg.text_bucket == "pow2":
        return _pow2(n, cfg.min_text_len)
    if isinstance(cfg.text_bucket, tuple):
        fit = [b for b in cfg.text_bucket if b >= n]
        if not fit:
            raise ValueError(f"a row of {n} tokens does not fit the largest text bucket {max(cfg.text_bucket)}")
        return int(min(fit))
    if n > cfg.text_bucket:
        raise ValueError(f"a row of {n} tokens does not fit text_bucket {cfg.text_bucket}")
    return int(cfg.text_bucket)


def released_model_config(cfg: PromptConfig, ids: TokenIds):
    """A ModelConfig with the released Qwen3-VL vision settings (48x48 pos-embed table) and this tokenizer's
    vision ids: what to pass as `model_config` when preparing inputs for a released-size model. Tiny or custom
    models must pass their own config (the pos-embed taps depend on its table size)."""
    from coordexp_jax.model.config import ModelConfig, VisionConfig

    im = cfg.image
    return ModelConfig(vision=VisionConfig(patch_size=im.patch_size, temporal_patch_size=im.temporal_patch_size,
                                           spatial_merge_size=im.merge_size),
                       image_token_id=ids.image_pad, video_token_id=ids.video_pad)


def _check_model_config(cfg: PromptConfig, ids: TokenIds, model_config):
    """The model's config, checked against the image config and the tokenizer. It is required: the vision index
    arrays (pos-embed taps) depend on the model's table size, and a wrong default gives out-of-range taps."""
    if model_config is None:
        raise ValueError("model_config is required: the vision inputs depend on the model's position-embedding table "
                         "(use the model's config, or prompts.released_model_config(...) for released sizes)")
    im = cfg.image
    v = model_config.vision
    if (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) != (im.patch_size, im.temporal_patch_size,
                                                                        im.merge_size):
        raise ValueError(f"model vision (patch {v.patch_size}, T {v.temporal_patch_size}, merge "
                         f"{v.spatial_merge_size}) differs from the image config ({im.patch_size}, "
                         f"{im.temporal_patch_size}, {im.merge_size})")
    if (model_config.image_token_id, model_config.video_token_id) != (ids.image_pad, ids.video_pad):
        raise ValueError(f"model image/video token ids ({model_config.image_token_id}, {model_config.video_token_id})"
                         f" differ from the tokenizer's ({ids.image_pad}, {ids.video_pad})")
    return model_config


def instruction_text(cfg: "PromptConfig", r: Record) -> str:
    """The user instruction of record `r`: its own `prompt`, else the task's template of `cfg` with the grounding
    phrase / counting category filled in. Raises SampleError naming the record when the template needs a phrase or
    category the record does not have."""
    if r.prompt is not None:
        return r.prompt
    tmpl = cfg.instruction(r.task)
    descs = [o.desc for o in r.objects]
    if r.task == "grounding":
        if not descs:
            raise SampleError(f"{r.source}: a grounding record with no objects needs a 'prompt' (no phrase)")
        if len(set(descs)) > 1:
            raise SampleError(f"{r.source}: grounding objects have different descs {sorted(set(descs))[:4]}; "
                              f"one record holds one referring phrase")
        return tmpl.format(phrase=descs[0])
    if r.task == "counting":
        if not descs:
            raise SampleError(f"{r.source}: a counting record with no objects needs a 'prompt' (no category)")
        return tmpl.format(category=descs[0])
    return tmpl


class SampleEncoder:
    """record -> sample dict (one row, unpadded), or None when the sample is dropped (image unreadable, too long).

    Picklable (Grain workers): the tokenizer is loaded from `tokenizer_dir` in each process on first use, or
    given directly. `counts` holds this process's drops by reason.
    """

    def __init__(self, cfg: PromptConfig = PromptConfig(), tokenizer=None, tokenizer_dir: str | None = None,
                 seed: int = 0):
        if tokenizer is None and tokenizer_dir is None:
            raise ValueError("SampleEncoder needs a tokenizer or a tokenizer_dir")
        self.cfg, self.seed = cfg, seed
        self._tok, self.tokenizer_dir = tokenizer, tokenizer_dir
        self._ids: TokenIds | None = None
        self._cache: dict = {}
        self.counts: dict[str, int] = {}
        if cfg.protocol == "tags" and not self.token_ids.has_tags:
            raise ValueError("protocol 'tags' needs a tokenizer with the tag tokens")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = {}
        if self.tokenizer_dir is not None:
            d["_tok"] = None
        return d

    @property
    def needs_rng(self) -> bool:
        return self.cfg.order == "random"

    @property
    def tokenizer(self):
        if self._tok is None:
            from coordexp_jax.data.tokenizer import load_tokenizer

            with _LOAD_LOCK:
                if self._tok is None:
                    self._tok = load_tokenizer(self.tokenizer_dir)
        return self._tok

    @property
    def token_ids(self) -> TokenIds:
        if self._ids is None:
            self._ids = token_ids_from_tokenizer(self.tokenizer,
                                                 require_coords=protocols.uses_coord_tokens(self.cfg.protocol))
        return self._ids

    def _enc(self, text: str) -> list[int]:
        hit = self._cache.get(text)
        if hit is None:
            hit = self._cache[text] = encode_text(self.tokenizer, text)
            if len(self._cache) > 4096:
                self._cache.clear()
        return list(hit)

    def _drop(self, reason: str, r: Record, detail: str):
        self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("%s: %s: %s (sample dropped)", r.source, reason, detail)
        return None

    # ------------------------------------------------------------------ prompt
    def instruction_text(self, r: Record) -> str:
        """The user instruction of record `r` (`instruction_text(self.cfg, r)`)."""
        return instruction_text(self.cfg, r)

    def prompt_ids(self, r: Record, num_image_tokens: int) -> list[int]:
        """The prompt through `<|im_start|>assistant\\n` (the generation prompt)."""
        t = self.token_ids
        ids: list[int] = []
        if self.cfg.system_prompt is not None:
            ids += [t.im_start] + self._enc("system\n" + self.cfg.system_prompt) + [t.im_end] + self._enc("\n")
        ids += [t.im_start] + self._enc("user\n") + [t.vision_start] + [t.image_pad] * num_image_tokens
        ids += [t.vision_end] + self._enc(self.instruction_text(r)) + [t.im_end] + self._enc("\n")
        ids += [t.im_start] + self._enc("assistant\n")
        return ids

    # ------------------------------------------------------------------ answer
    def answer(self, r: Record, rng: np.random.Generator | None = None):
        """-> (answer-body ids, coord positions [m,4] or [m,2] into them, continuous boxes [m,4] or None)."""
        cfg, tok, t = self.cfg, self.tokenizer, self.token_ids
        if r.task == "counting":
            if cfg.protocol != "coordjson":
                raise SampleError(f"{r.source}: counting answers need protocol coordjson")
            pts = [o.point if o.point is not None else ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2)
                   for o in r.objects]
            s = protocols.serialize_count(np.asarray(pts, np.float64).reshape(-1, 2), tok, t, mode=cfg.pixel_mode)
            return s.ids, s.coord_positions, None
        objs = [o for o in r.objects if o.box is not None]
        if len(objs) != len(r.objects):
            raise SampleError(f"{r.source}: {r.task} objects need bbox_2d (points are for counting)")
        seed = None
        if cfg.order == "random":
            seed = int(rng.integers(2**31)) if rng is not None else zlib.crc32(f"{self.seed}:{r.source}".encode())
        s = protocols.serialize([protocols.AnswerObject(o.desc, o.box) for o in objs], tok, t, cfg.protocol,
                                cfg.order, seed=seed, mode=cfg.pixel_mode)
        if not protocols.uses_coord_tokens(cfg.protocol):  # coordinates as text: no box slots
            return s.ids, s.coord_positions, None
        boxes = np.asarray([objs[i].box for i in s.order], np.float32).reshape(-1, 4)
        return s.ids, s.coord_positions, boxes

    # ------------------------------------------------------------------ sample
    def load_pixels(self, r: Record):
        img = image_lib.load_image(r.image)
        if img.shape[:2] != (r.height, r.width):
            raise image_lib.ImageSizeMismatchError(f"{r.image}: decoded {img.shape[1]}x{img.shape[0]} (EXIF "
                                                   f"orientation applied) but the record ({r.source}) says "
                                                   f"{r.width}x{r.height}")
        pv, grid, _ = image_lib.process_image(img, self.cfg.image, name=f"{r.source} ({r.image})")
        return pv, grid

    def __call__(self, r: Record, rng: np.random.Generator | None = None):
        try:
            pv, grid = self.load_pixels(r)
        except image_lib.ImageLoadError as e:
            reason = "size_mismatch" if isinstance(e, image_lib.ImageSizeMismatchError) else "unreadable_image"
            return self._drop(reason, r, str(e))
        n_img = grid[0] * grid[1] * grid[2] // (self.cfg.image.merge_size ** 2)
        prompt = self.prompt_ids(r, n_img)
        body, cpos, boxes = self.answer(r, rng)
        ids = prompt + list(body) + [self.token_ids.im_end]
        n = len(ids)
        if n > self.cfg.max_text_len:
            return self._drop("too_long", r, f"{n} tokens > max_text_len {self.cfg.max_text_len}")
        ids = np.asarray(ids, np.int32)
        targets = np.empty_like(ids)
        targets[:-1] = ids[1:]
        targets[-1] = self.token_ids.pad
        loss_mask = np.zeros(n, np.float32)
        loss_mask[len(prompt) - 1:n - 1] = 1.0  # positions predicting the answer tokens and <|im_end|>
        m = min(len(cpos), self.cfg.max_objects) if boxes is not None else 0
        box_pos = (len(prompt) + np.asarray(cpos[:m], np.int32) - 1).reshape(m, 4)
        box_target = (boxes[:m] if boxes is not None else np.zeros((0, 4), np.float32)).astype(np.float32)
        return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "box_pos": box_pos,
                "box_target": box_target, "pixel_values": pv, "grid_thw": np.asarray(grid, np.int32),
                "num_objects": np.int32(len(cpos))}


class Collator:
    """List of samples -> one training batch with the contract's keys and static shapes.

    B = len(samples) rows of S = bucket(max length) tokens (right-padded); I = B image slots of P patches; M box
    slots. `model_config` (optional) must agree with the tokenizer's image token and the image config.
    """

    def __init__(self, cfg: PromptConfig, token_ids: TokenIds, model_config):
        self.cfg, self.ids = cfg, token_ids
        self.model_config = _check_model_config(cfg, token_ids, model_config)
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Called by Grain inside worker processes: big arrays then travel through shared memory, not pickles."""
        self._shared_memory = True

    def _to_shared_memory(self, out: dict) -> dict:
        from grain.python import SharedMemoryArray

        for k, v in out.items():
            if isinstance(v, np.ndarray) and v.nbytes >= (1 << 20):
                shm = SharedMemoryArray(v.shape, dtype=v.dtype)
                np.copyto(shm, v, casting="no")
                out[k] = shm
        return out

    def patches_per_slot(self, sizes: Sequence[int]) -> int:
        if self.cfg.patches_per_slot is not None:
            return self.cfg.patches_per_slot
        return _pow2(max(sizes), self.cfg.image.merge_size ** 2)

    def text_arrays(self, samples: Sequence[dict]) -> dict:
        """The right-padded text block of a batch: input_ids, attention_mask, targets, loss_mask [B, S] (S = the
        bucket of the longest row) and box_pos [B, M, 4], box_target [B, M, 4], box_valid [B, M]."""
        B, M = len(samples), self.cfg.max_objects
        S = bucket_len(max(len(s["input_ids"]) for s in samples), self.cfg)
        ids = np.full((B, S), self.ids.pad, np.int32)
        am = np.zeros((B, S), np.int32)
        targets = np.full((B, S), self.ids.pad, np.int32)
        loss_mask = np.zeros((B, S), np.float32)
        box_pos = np.zeros((B, M, 4), np.int32)
        box_target = np.zeros((B, M, 4), np.float32)
        box_valid = np.zeros((B, M), bool)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[b, :n], am[b, :n], targets[b, :n], loss_mask[b, :n] = s["input_ids"], 1, s["targets"], s["loss_mask"]
            m = len(s["box_pos"])
            box_pos[b, :m], box_target[b, :m], box_valid[b, :m] = s["box_pos"], s["box_target"], True
        return dict(input_ids=ids, attention_mask=am, targets=targets, loss_mask=loss_mask, box_pos=box_pos,
                    box_target=box_target, box_valid=box_valid)

    def __call__(self, samples: Sequence[dict]) -> dict:
        from coordexp_jax.model.inputs import build_model_inputs

        B = len(samples)
        t = self.text_arrays(samples)
        ids, am, targets, loss_mask = t["input_ids"], t["attention_mask"], t["targets"], t["loss_mask"]
        box_pos, box_target, box_valid = t["box_pos"], t["box_target"], t["box_valid"]
        grids = [tuple(int(x) for x in s["grid_thw"]) for s in samples]
        P = self.patches_per_slot([int(np.prod(g)) for g in grids])
        out = build_model_inputs(ids, am, grids, [s["pixel_values"] for s in samples], config=self.model_config,
                                 num_slots=B, patches_per_slot=P)
        out.update(targets=targets, loss_mask=loss_mask,
                   coord_mask=(loss_mask > 0) & self.ids.is_coord(targets),
                   box_pos=box_pos, box_target=box_target, box_valid=box_valid,
                   num_objects=np.asarray([s["num_objects"] for s in samples], np.int32))
        return self._to_shared_memory(out) if self._shared_memory else out


def encode_prompts(records: Sequence[Record], encoder: SampleEncoder, *, model_config,
                   pixels: Sequence[tuple] | None = None) -> dict:
    """Prompt-only batch for rollout / evaluation: left-padded to the text bucket, the same model-input keys as a
    training batch (input_ids, attention_mask, positions, rope_deltas, vision arrays, visual_index), plus
    `prompt_lengths [B]`. `pixels[i] = (pixel_values, grid_thw)` skips loading the images again."""
    from coordexp_jax.model.inputs import build_model_inputs

    cfg, t = encoder.cfg, encoder.token_ids
    pvs, grids, rows = [], [], []
    for i, r in enumerate(records):
        pv, grid = pixels[i] if pixels is not None else encoder.load_pixels(r)
        pvs.append(pv)
        grids.append(tuple(int(x) for x in grid))
        rows.append(encoder.prompt_ids(r, int(np.prod(grid)) // cfg.image.merge_size ** 2))
    B = len(rows)
    S = bucket_len(max(len(x) for x in rows), cfg)
    ids = np.full((B, S), t.pad, np.int32)
    am = np.zeros((B, S), np.int32)
    for b, x in enumerate(rows):
        ids[b, S - len(x):], am[b, S - len(x):] = x, 1
    coll = Collator(cfg, t, model_config)
    out = build_model_inputs(ids, am, grids, pvs, config=coll.model_config, num_slots=B,
                             patches_per_slot=coll.patches_per_slot([int(np.prod(g)) for g in grids]))
    out["prompt_lengths"] = np.asarray([len(x) for x in rows], np.int32)
    return out
