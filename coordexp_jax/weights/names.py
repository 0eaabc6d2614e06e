"""The one HF <-> NNX name table, used in both directions, with explicit transforms (no guessing from rank).

Each `Entry` maps one HF tensor name to one NNX parameter path and a transform kind:
    copy    : same array (norm scales/biases, biases, the pos-embed table, q/k norms)
    linear  : torch Linear weight (out, in)  <->  Dense kernel (in, out)            (transpose)
    patch   : Conv3d weight (D, C, T, p, p)  <->  Dense kernel (C*T*p*p, D)        (reshape + transpose)
    embed   : embedding (V, H)               <->  (V_padded, H)                    (pad rows with zeros / drop them)
    lm_head : Linear weight (V, H)           <->  Dense kernel (H, V_padded)       (transpose + pad / drop columns)
Vocabulary padding is handled here and only here.

HF names stay per layer in both layouts. For a scanned model (`ModelConfig.scan_layers`) the entries of decoder
layer / ViT block i carry `layer=i` and the stacked path without the index (`language_model.layers.self_attn...`):
the tensor is slice i of the stacked [n_layers, ...] parameter (stacked on load, sliced on export).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..model.config import ModelConfig

from coordexp_jax.errors import CoordExpError


class WeightsError(CoordExpError, ValueError):
    """A checkpoint that does not match the model: the message names the tensor (and the file)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str
    path: tuple
    kind: str
    layer: int | None = None  # scanned layout: the slice of the stacked parameter at `path`


def _linear(hf_prefix, path, bias=True, layer=None):
    out = [Entry(f"{hf_prefix}.weight", path + ("kernel",), "linear", layer)]
    if bias:
        out.append(Entry(f"{hf_prefix}.bias", path + ("bias",), "copy", layer))
    return out


def _ln(hf_prefix, path, layer=None):
    return [Entry(f"{hf_prefix}.weight", path + ("scale",), "copy", layer),
            Entry(f"{hf_prefix}.bias", path + ("bias",), "copy", layer)]


def name_table(config: ModelConfig) -> list[Entry]:
    """Every parameter of `config`'s model, in a stable order (vision, text, head); stacked paths with `layer` set
    when `config.scan_layers`."""
    v, t = config.vision, config.text
    scan = config.scan_layers
    e: list[Entry] = []
    e.append(Entry("model.visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch"))
    e.append(Entry("model.visual.patch_embed.proj.bias", ("visual", "patch_embed", "bias"), "copy"))
    e.append(Entry("model.visual.pos_embed.weight", ("visual", "pos_embed"), "copy"))
    for i in range(v.depth):
        hp = f"model.visual.blocks.{i}"
        p, li = (("visual", "blocks"), i) if scan else (("visual", "blocks", i), None)
        e += _ln(f"{hp}.norm1", p + ("norm1",), li) + _ln(f"{hp}.norm2", p + ("norm2",), li)
        e += (_linear(f"{hp}.attn.qkv", p + ("attn", "qkv"), layer=li)
              + _linear(f"{hp}.attn.proj", p + ("attn", "proj"), layer=li))
        e += (_linear(f"{hp}.mlp.linear_fc1", p + ("mlp", "linear_fc1"), layer=li)
              + _linear(f"{hp}.mlp.linear_fc2", p + ("mlp", "linear_fc2"), layer=li))
    mergers = [("model.visual.merger", ("visual", "merger"))] + [
        (f"model.visual.deepstack_merger_list.{k}", ("visual", "deepstack_merger_list", k))
        for k in range(len(v.deepstack_visual_indexes))]
    for hp, p in mergers:
        e += _ln(f"{hp}.norm", p + ("norm",))
        e += _linear(f"{hp}.linear_fc1", p + ("linear_fc1",)) + _linear(f"{hp}.linear_fc2", p + ("linear_fc2",))
    e.append(Entry("model.language_model.embed_tokens.weight", ("language_model", "embed_tokens", "embedding"), "embed"))
    for i in range(t.num_hidden_layers):
        hp = f"model.language_model.layers.{i}"
        p, li = (("language_model", "layers"), i) if scan else (("language_model", "layers", i), None)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            e += _linear(f"{hp}.self_attn.{n}", p + ("self_attn", n), bias=t.attention_bias, layer=li)
        e.append(Entry(f"{hp}.self_attn.q_norm.weight", p + ("self_attn", "q_norm", "scale"), "copy", li))
        e.append(Entry(f"{hp}.self_attn.k_norm.weight", p + ("self_attn", "k_norm", "scale"), "copy", li))
        for n in ("gate_proj", "up_proj", "down_proj"):
            e += _linear(f"{hp}.mlp.{n}", p + ("mlp", n), bias=False, layer=li)
        e.append(Entry(f"{hp}.input_layernorm.weight", p + ("input_layernorm", "scale"), "copy", li))
        e.append(Entry(f"{hp}.post_attention_layernorm.weight", p + ("post_attention_layernorm", "scale"), "copy", li))
    e.append(Entry("model.language_model.norm.weight", ("language_model", "norm", "scale"), "copy"))
    if not config.tie_word_embeddings:
        e.append(Entry("lm_head.weight", ("lm_head", "kernel"), "lm_head"))
    # Both directions depend on the table being a bijection.
    hf = [x.hf for x in e]
    paths = [(x.path, x.layer) for x in e]
    for names, what in ((hf, "HF name"), (paths, "NNX path")):
        seen = set()
        for n in names:
            if n in seen:
                raise WeightsError(f"name table: duplicate {what} {n}")
            seen.add(n)
    return e


TIED_HF_HEAD = "lm_head.weight"


def hf_shape(entry: Entry, our_shape: tuple, config: ModelConfig) -> tuple:
    """The torch/safetensors shape of `entry` given our parameter shape (the stacked shape for a scanned entry)."""
    V = config.vocab_size
    if entry.layer is not None:
        our_shape = tuple(our_shape)[1:]
    if entry.kind == "copy":
        return tuple(our_shape)
    if entry.kind == "linear":
        return (our_shape[1], our_shape[0])
    if entry.kind == "patch":
        v = config.vision
        return (our_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if entry.kind == "embed":
        return (V, our_shape[1])
    if entry.kind == "lm_head":
        return (V, our_shape[0])
    raise AssertionError(entry.kind)


def to_ours(entry: Entry, x: np.ndarray, our_shape: tuple, config: ModelConfig) -> np.ndarray:
    """HF array -> our layout (numpy; dtype unchanged; one layer's slice for a scanned entry, whose `our_shape` may
    be the stacked shape). Raises WeightsError on a shape mismatch, naming the tensor."""
    want = hf_shape(entry, our_shape, config)
    if entry.layer is not None:
        our_shape = tuple(our_shape)[1:]
    if tuple(x.shape) != tuple(want):
        raise WeightsError(f"tensor {entry.hf}: shape {tuple(x.shape)} in the checkpoint, config.json implies {tuple(want)}")
    if entry.kind == "copy":
        return x
    if entry.kind == "linear":
        return np.ascontiguousarray(x.T)
    if entry.kind == "patch":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    pad = our_shape[0] - x.shape[0] if entry.kind == "embed" else our_shape[1] - x.shape[0]
    if entry.kind == "embed":
        return np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x
    y = np.ascontiguousarray(x.T)
    return np.concatenate([y, np.zeros((y.shape[0], pad), y.dtype)], 1) if pad else y


def to_hf(entry: Entry, y: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Our array -> HF layout (numpy; exact inverse of `to_ours`, drops the vocabulary padding)."""
    V = config.vocab_size
    if entry.kind == "copy":
        return y
    if entry.kind == "linear":
        return np.ascontiguousarray(y.T)
    if entry.kind == "patch":
        return np.ascontiguousarray(y.T).reshape(hf_shape(entry, y.shape, config))
    if entry.kind == "embed":
        return y[:V]
    return np.ascontiguousarray(y[:, :V].T)
