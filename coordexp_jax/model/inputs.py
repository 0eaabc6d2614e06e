"""Host-side (numpy, no jax) builders of every shape-dependent model input (docs/architecture.md, "model inputs").

- `get_rope_index`: 3-D M-RoPE positions [3,B,S] and per-row rope deltas [B] (spec §3.4, transformers 5.23).
- `build_vision_inputs`: per-item flat `pixel_values` [t*h*w, C*T*p*p] (processor order = merge-block order) and
  grids (t,h,w) -> slot arrays `pixel_values [I,P,F]`, `vision_segment_ids [I,P]`, `vision_pos_taps [I,P,4]`,
  `vision_pos_weights [I,P,4]`, `vision_rope_rc [I,P,2]`, plus where each item's merged tokens land.
  Also `vision_token_rect [I,P/4,4]`: the pixel rectangle of each merged token (spatial linking).
- `build_visual_index`: [B,S] index of each placeholder token's merged visual token in the flat `[I*P/4]` output.
- `build_visual_image`: [B,S] which image of its row (0-based, order of appearance) each image placeholder shows.
- `build_model_inputs`: all of the above in one dict with exactly the contract's keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """0 text, 1 image placeholder, 2 video placeholder (what the HF processor makes) [B,S] int32."""
    ids = np.asarray(input_ids)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT)).astype(np.int32)


def get_rope_index(input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None, *,
                   image_token_id: int, video_token_id: int, spatial_merge_size: int = 2, mm_token_type_ids_=None):
    """3-D positions for a batch of prompts, exactly as transformers 5.23 `get_rope_index` (spec §3.4).

    input_ids [B,S]; attention_mask [B,S] (1 = real; None = all real); image_grid_thw [n_img,3] and
    video_grid_thw [n_vid,3] in patches, consumed in batch-major order of appearance. Each temporal patch of a video
    is its own run. Returns positions [3,B,S] int32 (0 at pads) and rope_deltas [B] int32
    (= max position + 1 - number of real tokens).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B,S], got shape {ids.shape}")
    B, S = ids.shape
    mask = np.ones((B, S), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    types = (mm_token_type_ids(ids, image_token_id, video_token_id) if mm_token_type_ids_ is None
             else np.asarray(mm_token_type_ids_))
    images = iter([] if image_grid_thw is None else [tuple(int(x) for x in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)])
    videos = []
    if video_grid_thw is not None:
        for t, h, w in np.asarray(video_grid_thw).reshape(-1, 3):
            videos += [(1, int(h), int(w))] * int(t)  # one run per temporal patch
    videos = iter(videos)
    m = spatial_merge_size
    pos = np.zeros((3, B, S), np.int64)
    deltas = np.zeros((B,), np.int64)
    for b in range(B):
        keep = mask[b]
        tb = types[b][keep]
        cur = 0
        chunks = []
        for kind, run in itertools.groupby(tb.tolist()):
            n = len(list(run))
            if kind == TEXT:
                chunks.append(np.broadcast_to(cur + np.arange(n), (3, n)))
                cur += n
                continue
            try:
                t, h, w = next(images) if kind == IMAGE else next(videos)
            except StopIteration:
                raise ValueError(f"row {b}: more {'image' if kind == IMAGE else 'video'} runs than grids given") from None
            hh, ww = h // m, w // m
            if t * hh * ww != n:
                raise ValueError(f"row {b}: a run of {n} {'image' if kind == IMAGE else 'video'} tokens does not match "
                                 f"grid (t={t}, h={h}, w={w}) -> {t * hh * ww} tokens")
            tt, rr, cc = np.meshgrid(np.arange(t), np.arange(hh), np.arange(ww), indexing="ij")
            chunks.append(np.stack([tt.ravel(), rr.ravel(), cc.ravel()]) + cur)
            cur += max(h, w) // m
        p = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        pos[:, b, keep] = p
        deltas[b] = (p.max() + 1 - p.shape[1]) if p.shape[1] else 0
    if next(images, None) is not None or next(videos, None) is not None:
        raise ValueError("more image/video grids given than placeholder runs in input_ids")
    return pos.astype(np.int32), deltas.astype(np.int32)


def block_order_rc(h: int, w: int, m: int = 2) -> np.ndarray:
    """(row, col) of each patch of an h x w grid in merge-block order (spec §2.1): [h*w, 2]."""
    R, C, i, j = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij")
    return np.stack([(R * m + i).ravel(), (C * m + j).ravel()], -1)


def pos_embed_taps(rc: np.ndarray, h: int, w: int, side: int):
    """Bilinear (align_corners=True) taps [N,4] int32 and weights [N,4] float32 into the side x side table (spec §2.3)."""
    row = rc[:, 0].astype(np.float32)
    col = rc[:, 1].astype(np.float32)
    # float32, multiply then divide, exactly as transformers 5.23.
    sr = row * np.float32(side - 1) / np.float32(max(h - 1, 1))
    sc = col * np.float32(side - 1) / np.float32(max(w - 1, 1))
    r0 = np.floor(sr).astype(np.int64)
    c0 = np.floor(sc).astype(np.int64)
    r1 = np.minimum(r0 + 1, side - 1)
    c1 = np.minimum(c0 + 1, side - 1)
    fr = (sr - r0.astype(np.float32)).astype(np.float32)
    fc = (sc - c0.astype(np.float32)).astype(np.float32)
    taps = np.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], -1).astype(np.int32)
    one = np.float32(1)
    weights = np.stack([(one - fr) * (one - fc), (one - fr) * fc, fr * (one - fc), fr * fc], -1).astype(np.float32)
    return taps, weights


def merged_token_rects(t: int, h: int, w: int, patch_size: int = 16, m: int = 2) -> np.ndarray:
    """[t*h*w/m^2, 4] float32 pixel rectangles (x1, y1, x2, y2) of an item's merged tokens in merger order.

    Grid (t, h, w) in patches; the item is `w * patch_size` x `h * patch_size` pixels as the model sees it (the
    resized image). Merged token j covers the m x m patch block (R, C) of the block-order grid (spec §2.1: blocks
    row-major, so R = j // (w/m), C = j % (w/m) within a frame); frames repeat the same rectangles."""
    R, C = np.meshgrid(np.arange(h // m), np.arange(w // m), indexing="ij")
    cell = m * patch_size
    r = np.stack([C.ravel() * cell, R.ravel() * cell, (C.ravel() + 1) * cell, (R.ravel() + 1) * cell], -1)
    return np.tile(r, (t, 1)).astype(np.float32)


def build_vision_inputs(pixel_values_list: Sequence[np.ndarray], grid_thw_list, *, num_slots: int | None = None,
                        patches_per_slot: int | None = None, spatial_merge_size: int = 2,
                        num_position_embeddings: int = 2304, pack: bool = False, patch_size: int = 16):
    """Vision slot arrays from per-item flat patches (merge-block order, as the HF processor emits them).

    pixel_values_list[i]: [t*h*w, F]; grid_thw_list[i] = (t, h, w) in patches. Each item goes to its own slot, or with
    `pack=True` first-fit into slots (items never straddle slots). `P` defaults to the largest item rounded up to a
    multiple of 4; `I` to the slots used. Returns (arrays, item_offsets) where arrays has `pixel_values [I,P,F] f32`,
    `vision_segment_ids [I,P] i32` (one id per temporal patch, -1 on padding), `vision_pos_taps [I,P,4] i32`,
    `vision_pos_weights [I,P,4] f32`, `vision_rope_rc [I,P,2] i32`, `vision_token_rect [I,P/m^2,4] f32` (pixel
    rectangle x1, y1, x2, y2 of each merged token in the item's resized image, `merged_token_rects`; 0 on padding),
    and item_offsets[i] is the index of item i's first merged token in the flat `[I*P/m^2]` merger output.
    """
    m2 = spatial_merge_size ** 2
    side = int(num_position_embeddings ** 0.5)
    grids = [tuple(int(x) for x in g) for g in grid_thw_list]
    if len(grids) != len(pixel_values_list):
        raise ValueError(f"{len(pixel_values_list)} pixel_values for {len(grids)} grids")
    sizes = []
    for i, ((t, h, w), pv) in enumerate(zip(grids, pixel_values_list)):
        if h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"item {i}: grid h={h}, w={w} not divisible by spatial_merge_size {spatial_merge_size}")
        if np.shape(pv)[0] != t * h * w:
            raise ValueError(f"item {i}: pixel_values has {np.shape(pv)[0]} patches, grid {grids[i]} needs {t * h * w}")
        sizes.append(t * h * w)
    F = np.shape(pixel_values_list[0])[1] if pixel_values_list else 1536
    P = patches_per_slot if patches_per_slot is not None else max([m2] + [-(-s // m2) * m2 for s in sizes])
    if P % m2:
        raise ValueError(f"patches_per_slot {P} must be a multiple of {m2}")
    for i, s in enumerate(sizes):
        if s > P:
            raise ValueError(f"item {i} has {s} patches, more than patches_per_slot {P}")
    # Slot assignment.
    slot_fill: list[int] = []
    place = []
    for s in sizes:
        k = next((j for j, f in enumerate(slot_fill) if pack and f + s <= P), None)
        if k is None:
            slot_fill.append(0)
            k = len(slot_fill) - 1
        place.append((k, slot_fill[k]))
        slot_fill[k] += s
    I = num_slots if num_slots is not None else max(1, len(slot_fill))
    if len(slot_fill) > I:
        raise ValueError(f"{len(sizes)} vision items need {len(slot_fill)} slots, only {I} given")
    pix = np.zeros((I, P, F), np.float32)
    seg = np.full((I, P), -1, np.int32)
    taps = np.zeros((I, P, 4), np.int32)
    wts = np.zeros((I, P, 4), np.float32)
    rc_all = np.zeros((I, P, 2), np.int32)
    rects = np.zeros((I, P // m2, 4), np.float32)
    next_seg = [0] * I
    offsets = []
    for (t, h, w), pv, (k, off) in zip(grids, pixel_values_list, place):
        n = t * h * w
        pix[k, off:off + n] = np.asarray(pv, np.float32)
        rc = block_order_rc(h, w, spatial_merge_size)
        tp, wt = pos_embed_taps(rc, h, w, side)
        for ti in range(t):
            sl = slice(off + ti * h * w, off + (ti + 1) * h * w)
            seg[k, sl] = next_seg[k]
            next_seg[k] += 1
            taps[k, sl] = tp
            wts[k, sl] = wt
            rc_all[k, sl] = rc
        rects[k, off // m2:(off + n) // m2] = merged_token_rects(t, h, w, patch_size, spatial_merge_size)
        offsets.append((k * P + off) // m2)
    arrays = dict(pixel_values=pix, vision_segment_ids=seg, vision_pos_taps=taps, vision_pos_weights=wts,
                  vision_rope_rc=rc_all, vision_token_rect=rects)
    return arrays, offsets


def build_visual_index(input_ids, image_offsets, image_tokens, video_offsets=(), video_tokens=(), *,
                       image_token_id: int, video_token_id: int) -> np.ndarray:
    """[B,S] int32: for each image/video placeholder (row-major over B,S) the flat merged-token index; -1 elsewhere.

    image_offsets[i] / image_tokens[i]: first flat merged index and token count of image i (order of appearance).
    """
    ids = np.asarray(input_ids)
    vi = np.full(ids.shape, -1, np.int32)
    for tok, offs, counts, name in ((image_token_id, image_offsets, image_tokens, "image"),
                                    (video_token_id, video_offsets, video_tokens, "video")):
        flat = np.concatenate([o + np.arange(c) for o, c in zip(offs, counts)]).astype(np.int32) if len(offs) else np.zeros((0,), np.int32)
        where = ids == tok
        if int(where.sum()) != flat.shape[0]:
            raise ValueError(f"{int(where.sum())} {name} placeholder tokens in input_ids but the {name}s give "
                             f"{flat.shape[0]} merged tokens")
        vi[where] = flat  # boolean assignment is row-major, as HF masked_scatter
    return vi


def build_visual_image(input_ids, image_tokens, *, image_token_id: int) -> np.ndarray:
    """[B,S] int32: for each image placeholder, which image of its row it belongs to (0-based, order of appearance);
    -1 elsewhere (text, padding, video placeholders).

    image_tokens[i]: merged-token count of image i, images in batch-major order of appearance (as
    `build_visual_index`): image i's placeholders are the next image_tokens[i] ones in row-major order. Raises
    ValueError when the counts do not match the placeholders or an image straddles two rows."""
    ids = np.asarray(input_ids)
    out = np.full(ids.shape, -1, np.int32)
    where = ids == image_token_id
    counts = [int(c) for c in image_tokens]
    if int(where.sum()) != sum(counts):
        raise ValueError(f"{int(where.sum())} image placeholder tokens in input_ids but the images give "
                         f"{sum(counts)} merged tokens")
    rows = np.nonzero(where)[0]  # row of each placeholder, row-major
    gid = np.repeat(np.arange(len(counts)), counts)
    local = np.zeros(len(counts), np.int64)
    first_in_row: dict[int, int] = {}
    start = 0
    for i, c in enumerate(counts):
        if c:
            rr = rows[start:start + c]
            if rr[0] != rr[-1]:
                raise ValueError(f"image {i} straddles rows {int(rr[0])} and {int(rr[-1])}")
            first_in_row.setdefault(int(rr[0]), i)
            local[i] = i - first_in_row[int(rr[0])]
        start += c
    out[where] = local[gid]
    return out


def build_model_inputs(input_ids, attention_mask, image_grids=(), pixel_values_list=(), *, config,
                       video_grids=(), video_pixel_values_list=(), num_slots: int | None = None,
                       patches_per_slot: int | None = None, pack: bool = False) -> dict:
    """Everything the model takes for a batch, as numpy arrays keyed as in docs/architecture.md.

    input_ids/attention_mask [B,S]; image_grids[i] = (t,h,w) and pixel_values_list[i] = [t*h*w, F] for the images in
    batch-major order of appearance (videos likewise). Returns input_ids, attention_mask, positions [3,B,S],
    rope_deltas [B] and, when there is any image or video (or num_slots is given), pixel_values,
    vision_segment_ids, vision_pos_taps, vision_pos_weights, vision_rope_rc, visual_index, and for spatial linking
    vision_token_rect [I,P/m^2,4] (pixels of the resized image) and visual_image [B,S] (`build_visual_image`).
    """
    ids = np.asarray(input_ids, np.int32)
    am = np.asarray(attention_mask, np.int32) if attention_mask is not None else np.ones_like(ids)
    m = config.vision.spatial_merge_size
    pos, deltas = get_rope_index(ids, am, np.asarray(image_grids).reshape(-1, 3) if len(image_grids) else None,
                                 np.asarray(video_grids).reshape(-1, 3) if len(video_grids) else None,
                                 image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                                 spatial_merge_size=m)
    out = dict(input_ids=ids, attention_mask=am, positions=pos, rope_deltas=deltas)
    items = list(pixel_values_list) + list(video_pixel_values_list)
    grids = list(image_grids) + list(video_grids)
    if not items and num_slots is None:
        return out
    arrays, offsets = build_vision_inputs(items, grids, num_slots=num_slots, patches_per_slot=patches_per_slot,
                                          spatial_merge_size=m, num_position_embeddings=config.vision.num_position_embeddings,
                                          pack=pack, patch_size=config.vision.patch_size)
    if not items:  # an all-padding vision block (static shapes for text-only batches)
        arrays["pixel_values"] = np.zeros(arrays["pixel_values"].shape[:2] + (config.vision.patch_dim,), np.float32)
    n_img = len(pixel_values_list)
    tokens = [int(np.prod(g)) // (m * m) for g in grids]
    out.update(arrays)
    out["visual_index"] = build_visual_index(ids, offsets[:n_img], tokens[:n_img], offsets[n_img:], tokens[n_img:],
                                             image_token_id=config.image_token_id, video_token_id=config.video_token_id)
    out["visual_image"] = build_visual_image(ids, tokens[:n_img], image_token_id=config.image_token_id)
    return out
