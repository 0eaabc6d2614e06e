"""Reference models in transformers (torch, CPU) for parity tests and benchmarks. Imports torch lazily."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


def build_hf_model(config: ModelConfig, *, seed: int = 0, perturb: bool = True, attn_implementation: str = "eager"):
    """A random float32 `Qwen3VLForConditionalGeneration` with our config; with `perturb` every parameter gets
    noise (norm weights != 1, biases != 0) so a parity test sees every tensor."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = Qwen3VLConfig(**config.to_hf())
    model = Qwen3VLForConditionalGeneration(hf_cfg).to(torch.float32)
    model.config._attn_implementation = attn_implementation
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                scale = 0.1 if p.ndim == 1 else 0.02
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    return model


def hf_kwargs(model, input_ids, attention_mask, image_grids=(), pixel_values_list=(), video_grids=(),
              video_pixel_values_list=()):
    """torch keyword arguments for HF forward/generate from numpy ids, mask and raw per-item patches."""
    import torch

    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    kw = dict(input_ids=ids, attention_mask=torch.from_numpy(np.asarray(attention_mask, np.int64)))
    cfg = model.config
    if len(pixel_values_list):
        kw["pixel_values"] = torch.from_numpy(np.concatenate(pixel_values_list).astype(np.float32))
        kw["image_grid_thw"] = torch.tensor(np.asarray(image_grids), dtype=torch.int64)
    if len(video_pixel_values_list):
        kw["pixel_values_videos"] = torch.from_numpy(np.concatenate(video_pixel_values_list).astype(np.float32))
        kw["video_grid_thw"] = torch.tensor(np.asarray(video_grids), dtype=torch.int64)
    if len(pixel_values_list) or len(video_pixel_values_list):
        kw["mm_token_type_ids"] = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    return kw


def hf_forward_logits(model, input_ids, attention_mask, **items):
    """HF logits [B,S,V] (numpy float32); `items` as in `hf_kwargs`."""
    import torch

    with torch.no_grad():
        out = model(**hf_kwargs(model, input_ids, attention_mask, **items))
    return out.logits.float().numpy()
