"""The full Qwen3-VL model (Flax NNX): vision tower, DeepStack, text decoder, heads, prefill/decode over a KV cache.

Parameter paths mirror the HF names (`visual.blocks.0.attn.qkv.kernel` <-> `model.visual.blocks.0.attn.qkv.weight`),
see `coordexp_jax/weights/names.py`. The vocabulary inside the model is padded to `config.padded_vocab_size`;
logits of padded ids are `PAD_LOGIT` (finfo(float32).min: as good as -inf for softmax/argmax, but 0 * it is 0, not NaN).

KV cache (a plain dict pytree, donate it to the jitted decode step):
    k, v      : list (one per text layer) of [B, nkv, L, hd] arrays, kv head major (keys after k_norm and RoPE,
                values raw); with config.scan_layers one stacked array [n_layers, B, nkv, L, hd] each. Head major,
                so that the decode step's attention reads each head's keys as one contiguous [L, hd] block
    mask      : [B, L] int32, 1 where the key slot holds a real token (prompt padding and unwritten slots are 0)
    index     : int32 scalar, the next write slot, shared by the whole batch (prompts are left-padded)
    next_pos  : [B] int32, the rope position of the next token of each row (n_valid + rope_delta)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import AttentionMask
from .config import ModelConfig, TextConfig
from .layers import Dense, Embed, RMSNorm, linear, row_logits
from .rope import mrope_cos_sin
from .scan import remat_policy, scan_apply, stack_modules
from .spatial_linking import ATTR as LINKING_ATTR, token_geometry
from .text import DecoderLayer
from .vision import VisionModel

PAD_LOGIT = float(np.finfo(np.float32).min)


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, padded_vocab: int, *, dtype, param_dtype, rngs, scan: bool = False):
        self.embed_tokens = Embed(padded_vocab, cfg.hidden_size, ("vocab", "embed"), dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs, std=cfg.initializer_range)
        if padded_vocab > cfg.vocab_size:  # padded rows start at zero
            self.embed_tokens.embedding.set_value(self.embed_tokens.embedding.get_value().at[cfg.vocab_size:].set(0))
        layers = [DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(cfg.num_hidden_layers)]
        # scan: one DecoderLayer whose parameters are stacked [n_layers, ...] (same values as the list)
        self.layers = stack_modules(layers) if scan else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


def _call_layer(layer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)


class Qwen3VL(nnx.Module):
    """Qwen3VLForConditionalGeneration. dtype: compute dtype; param_dtype: parameter storage dtype;
    remat: rematerialise each decoder layer and ViT block in the backward pass (training), keeping what
    `config.remat_policy` saves. `config.scan_layers`: layers and blocks stacked and run under `lax.scan`."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 remat: bool = False):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        Vp = config.padded_vocab_size
        self.visual = VisionModel(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  scan=config.scan_layers, remat=remat, remat_policy=config.remat_policy)
        self.language_model = TextModel(config.text, Vp, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                        scan=config.scan_layers)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(config.text.hidden_size, Vp, ("embed", "vocab"), bias=False, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs, std=config.text.initializer_range)
            if Vp > config.vocab_size:
                self.lm_head.kernel.set_value(self.lm_head.kernel.get_value().at[:, config.vocab_size:].set(0))
        else:
            self.lm_head = None

    # ------------------------------------------------------------------ pieces
    def _cos_sin(self, positions):
        t = self.config.text
        return mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, self.dtype)

    def embed(self, input_ids, vision: dict | None = None, links: dict | None = None):
        """Token embeddings with image features scattered in -> (h [B,S,H], deepstack list of [B,S,H] or None).
        With `links` (model/spatial_linking.py) and an attached `spatial_linking` module, the linked box-end tokens
        get the module's update; without either (or without images) h is exactly Qwen3-VL's."""
        h = self.language_model.embed_tokens(input_ids)
        if vision is None:
            return h, None
        feats, ds = self.visual(vision, self.config.attention)
        vi = vision["visual_index"]
        sel = (vi >= 0)[..., None]
        idx = jnp.maximum(vi, 0)
        h = jnp.where(sel, jnp.take(feats, idx, axis=0).astype(h.dtype), h)
        ds_tok = [jnp.where(sel, jnp.take(f, idx, axis=0).astype(h.dtype), 0) for f in ds]
        linking = getattr(self, LINKING_ATTR, None)
        if links is not None and linking is not None:
            h = linking(h, *token_geometry(vision), links)
        return h, ds_tok

    def link_attention(self, input_ids, vision: dict, links: dict):
        """The spatial-linking module's attention weights [B, N, heads, S] float32 over sequence positions (sum 1
        over the visual tokens a usable link selects, 0 elsewhere; no dropout), for heatmaps
        (`spatial_linking.heatmap` with `token_geometry(vision)`). Runs the vision tower and the embeddings only.
        Raises ValueError when the model has no spatial-linking module."""
        linking = getattr(self, LINKING_ATTR, None)
        if linking is None:
            raise ValueError("the model has no spatial-linking module (model.spatial_linking.enabled)")
        h, _ = self.embed(input_ids, vision)  # the DeepStack gathers are dead code under jit
        links = {k: v for k, v in links.items() if k != "rng"}
        return linking(h, *token_geometry(vision), links, return_weights=True)[1]

    def _layers(self, h, cos, sin, mask, ds_tok, cache: dict | None = None):
        """Runs every decoder layer over the whole sequence; DeepStack feature k is added after layer k.

        Returns h, or with `cache` (from init_cache) (h, k, v): the cache arrays with this sequence's keys and values
        written from slot 0. Per-layer loop, or one `lax.scan` over the stacked layers (config.scan_layers), where
        DeepStack is selected by the layer index."""
        n_ds = 0 if ds_tok is None else len(ds_tok)
        if not self.config.scan_layers:
            call = nnx.remat(_call_layer, policy=remat_policy(self.config.remat_policy)) if self.remat else _call_layer
            ks, vs = [], []
            for i, layer in enumerate(self.language_model.layers):
                h, k, v = call(layer, h, cos, sin, mask)
                if cache is not None:
                    ks.append(_write_prompt(cache["k"][i], k))
                    vs.append(_write_prompt(cache["v"][i], v))
                if i < n_ds:
                    h = h + ds_tok[i]
            return h if cache is None else (h, ks, vs)
        ds = jnp.stack(ds_tok) if n_ds else None  # [n_ds, B, S, H]

        def body(layer, i, carry):
            h, ck, cv = carry
            h, k, v = layer(h, cos, sin, mask)
            if ck is not None:
                ck = _write_prompt(ck, k, layer=i)
                cv = _write_prompt(cv, v, layer=i)
            if ds is not None:
                add = jax.lax.dynamic_index_in_dim(ds, jnp.minimum(i, n_ds - 1), keepdims=False)
                h = h + jnp.where(i < n_ds, add, jnp.zeros_like(add))
            return h, ck, cv

        ck, cv = (None, None) if cache is None else (cache["k"], cache["v"])
        h, ck, cv = scan_apply(self.language_model.layers, body, (h, ck, cv), remat=self.remat,
                               policy=self.config.remat_policy)
        return h if cache is None else (h, ck, cv)

    def causal_mask(self, attention_mask):
        """[B,S] 0/1 -> AttentionMask: causal and key padding, computed by `config.attention` (`.dense()`: [B,S,S])."""
        return AttentionMask.causal_padding(attention_mask, self.config.attention)

    def __call__(self, input_ids, positions, attention_mask, vision: dict | None = None, links: dict | None = None):
        """input_ids [B,S], positions [3,B,S], attention_mask [B,S], vision: the vision arrays + visual_index or None.
        links: the spatial-linking boxes (model/spatial_linking.py) or None. Returns the hidden states after the
        final norm [B,S,H]."""
        h, ds_tok = self.embed(input_ids, vision, links)
        cos, sin = self._cos_sin(positions)
        h = self._layers(h, cos, sin, self.causal_mask(attention_mask), ds_tok)
        return self.language_model.norm(h)

    # ------------------------------------------------------------------ heads
    def lm_logits(self, hidden):
        """hidden [..., H] -> float32 logits [..., padded_vocab]; padded ids get PAD_LOGIT."""
        if self.lm_head is None:
            w = self.language_model.embed_tokens.embedding[...]
            if jax.default_backend() == "cpu" and hidden.size == hidden.shape[-1]:  # decoding one row: row_logits
                logits = row_logits(hidden.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)
            else:
                logits = jnp.einsum("...h,vh->...v", hidden.astype(self.dtype), w.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        else:
            logits = linear(hidden.astype(self.dtype), self.lm_head.kernel[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        V = self.config.vocab_size
        if logits.shape[-1] > V:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < V, logits, PAD_LOGIT)
        return logits

    def coord_logits(self, hidden, coord_start, num_bins: int = 1000):
        """hidden [..., H] -> float32 [..., num_bins] = h @ W[coord_start:coord_start+num_bins].T (never the full vocab).
        Raises ValueError for a static coord_start < 0 (no coordinate tokens; `dynamic_slice` would clamp it to 0
        and return text rows)."""
        if isinstance(coord_start, int) and coord_start < 0:
            raise ValueError(f"coord_logits: coord_start {coord_start} < 0 (the tokenizer has no coordinate tokens)")
        if self.lm_head is None:
            w = jax.lax.dynamic_slice_in_dim(self.language_model.embed_tokens.embedding[...], coord_start, num_bins, 0)
            return jnp.einsum("...h,vh->...v", hidden.astype(self.dtype), w.astype(self.dtype),
                              preferred_element_type=jnp.float32)
        w = jax.lax.dynamic_slice_in_dim(self.lm_head.kernel[...], coord_start, num_bins, 1)
        return jnp.einsum("...h,hv->...v", hidden.astype(self.dtype), w.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        t = self.config.text
        dtype = dtype or self.dtype
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim)  # kv head major
        n = t.num_hidden_layers
        if self.config.scan_layers:
            k, v = jnp.zeros((n,) + shape, dtype), jnp.zeros((n,) + shape, dtype)
        else:
            k, v = [jnp.zeros(shape, dtype) for _ in range(n)], [jnp.zeros(shape, dtype) for _ in range(n)]
        return dict(k=k, v=v,
                    mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32),
                    next_pos=jnp.zeros((batch,), jnp.int32))

    def prefill(self, input_ids, positions, attention_mask, vision: dict | None = None, links: dict | None = None, *,
                cache: dict | None = None,
                cache_len: int | None = None):
        """Runs the (left-padded) prompt, DeepStack included, and fills a fresh cache from slot 0.

        input_ids [B,S], positions [3,B,S], attention_mask [B,S]; pass `cache` (from init_cache) or `cache_len` L >= S.
        Returns (logits of the last position [B, padded_vocab] float32, cache with index = S).
        """
        B, S = input_ids.shape
        if cache is None:
            cache = self.init_cache(B, cache_len if cache_len is not None else S)
        h, ds_tok = self.embed(input_ids, vision, links)
        cos, sin = self._cos_sin(positions)
        h, ks, vs = self._layers(h, cos, sin, self.causal_mask(attention_mask), ds_tok, cache=cache)
        h = self.language_model.norm(h[:, -1])
        logits = self.lm_logits(h)
        new = dict(
            k=ks,
            v=vs,
            mask=jax.lax.dynamic_update_slice(cache["mask"], attention_mask.astype(jnp.int32), (0, 0)),
            index=jnp.asarray(S, jnp.int32),
            # the next token's rope position: max over the 3 axes and valid slots + 1 (= n_valid + rope_delta)
            next_pos=(jnp.max(jnp.where(attention_mask[None] > 0, positions, -1), axis=(0, 2)) + 1).astype(jnp.int32),
        )
        return logits, new

    def decode_step(self, tokens, positions, cache: dict, layers: list | None = None):
        """One token per row. tokens [B] int; positions [B] or [3,B] (None: use cache["next_pos"]).
        Returns (logits [B, padded_vocab] float32, updated cache). No DeepStack (text tokens only).

        layers: with scan_layers, the per-layer modules `model.scan.unstack_module(self.language_model.layers)`,
        sliced once outside the caller's decode loop; they run one by one (static weights) instead of the layer
        scan, which would slice every layer's weights per step."""
        if positions is None:
            positions = cache["next_pos"]
        positions = jnp.asarray(positions, jnp.int32)
        if positions.ndim == 1:
            positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
        idx = cache["index"]
        B = tokens.shape[0]
        h = self.language_model.embed_tokens(tokens[:, None])
        cos, sin = self._cos_sin(positions[:, :, None])
        mask = (cache["mask"] > 0)[:, None, :]  # [B,1,L]: the earlier tokens (the new one is seen separately)
        kmask = jax.lax.dynamic_update_slice(cache["mask"], jnp.ones((B, 1), jnp.int32), (0, idx))
        if self.config.scan_layers and layers is not None:
            new_k, new_v = cache["k"], cache["v"]
            for i, layer in enumerate(layers):
                h, new_k, new_v = layer(h, cos, sin, mask, new_k, new_v, idx, layer=i)
        elif self.config.scan_layers:
            def body(layer, i, carry):
                return layer(carry[0], cos, sin, mask, carry[1], carry[2], idx, layer=i)

            h, new_k, new_v = scan_apply(self.language_model.layers, body, (h, cache["k"], cache["v"]))
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.language_model.layers):
                h, k, v = layer(h, cos, sin, mask, cache["k"][i], cache["v"][i], idx)
                new_k.append(k)
                new_v.append(v)
        logits = self.lm_logits(self.language_model.norm(h[:, 0]))
        cache = dict(k=new_k, v=new_v, mask=kmask, index=idx + 1, next_pos=positions[0] + 1)
        return logits, cache


def _write_prompt(cache, kv, layer=None):
    """cache [B,nkv,L,hd] with the prompt's keys or values kv [B,S,nkv,hd] written at slots [0, S); with `layer`
    (int32 scalar) the stacked cache [n_layers,B,nkv,L,hd] with them written into that layer's slots [0, S)."""
    kv = kv.transpose(0, 2, 1, 3).astype(cache.dtype)
    if layer is None:
        return jax.lax.dynamic_update_slice(cache, kv, (0, 0, 0, 0))
    return jax.lax.dynamic_update_slice(cache, kv[None], (layer, 0, 0, 0, 0))


def param_count(config: ModelConfig, *, padded: bool = False) -> int:
    """Parameters of a model built from `config` (via nnx.eval_shape, no memory); unpadded vocab unless `padded`."""
    abstract = nnx.eval_shape(lambda: Qwen3VL(config))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    if not padded:
        extra = config.padded_vocab_size - config.vocab_size
        heads = 1 if config.tie_word_embeddings else 2
        n -= extra * config.text.hidden_size * heads
    return n
