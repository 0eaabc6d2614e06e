"""Shared prompt builders for the model/weights tests (random ids, real placeholder layout, left padding)."""

import numpy as np


def make_row(cfg, rng, parts):
    """parts: int (a run of random text tokens), ("img", (t,h,w)) or ("vid", (t,h,w)).
    Returns (ids, image grids, image patches, video grids, video patches)."""
    ids, ig, ip, vg, vp = [], [], [], [], []
    m2 = cfg.vision.spatial_merge_size ** 2
    F = cfg.vision.patch_dim
    for p in parts:
        if isinstance(p, int):
            ids += list(rng.integers(0, cfg.vision_start_token_id - 10, p))
        elif p[0] == "img":
            t, h, w = p[1]
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // m2) + [cfg.vision_end_token_id]
            ig.append(p[1])
            ip.append(rng.standard_normal((t * h * w, F)).astype(np.float32))
        else:
            t, h, w = p[1]
            for _ in range(t):  # timestamp text, then one run per temporal patch
                ids += list(rng.integers(0, 50, 2)) + [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w // m2) + [cfg.vision_end_token_id]
            vg.append(p[1])
            vp.append(rng.standard_normal((t * h * w, F)).astype(np.float32))
    return ids, ig, ip, vg, vp


def make_batch(cfg, rng, rows):
    """Left-padded batch from rows of parts. Returns (ids [B,S], mask [B,S], items dict for build_model_inputs / HF)."""
    built = [make_row(cfg, rng, r) for r in rows]
    S = max(len(b[0]) for b in built)
    ids = np.zeros((len(rows), S), np.int32)
    mask = np.zeros((len(rows), S), np.int32)
    items = dict(image_grids=[], pixel_values_list=[], video_grids=[], video_pixel_values_list=[])
    for i, (r, ig, ip, vg, vp) in enumerate(built):
        ids[i, S - len(r):] = r
        mask[i, S - len(r):] = 1
        items["image_grids"] += ig
        items["pixel_values_list"] += ip
        items["video_grids"] += vg
        items["video_pixel_values_list"] += vp
    return ids, mask, items
