"""A tiny stand-in decoder with the rollout model interface (init_cache / prefill / decode_step), and a naive
no-cache reference forward, so the loop machinery can be tested independently of the real Qwen3-VL model.

One attention layer with a rotary-like position term, so wrong cache slots, wrong masks or wrong per-row
positions change the logits.
"""

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx


class ToyDecoder(nnx.Module):
    def __init__(self, vocab: int, hidden: int = 16, *, rngs: nnx.Rngs, scale: float = 3.0):
        init = nnx.initializers.normal(1.0)
        self.embed = nnx.Param(init(rngs.params(), (vocab, hidden)))
        self.wq = nnx.Param(init(rngs.params(), (hidden, hidden)) / hidden ** 0.5)
        self.wk = nnx.Param(init(rngs.params(), (hidden, hidden)) / hidden ** 0.5)
        self.wv = nnx.Param(init(rngs.params(), (hidden, hidden)) / hidden ** 0.5)
        self.out = nnx.Param(init(rngs.params(), (hidden, vocab)) * scale / hidden ** 0.5)
        self.hidden = hidden
        self.vocab = vocab

    def _posenc(self, pos):  # pos [...] int -> [..., H]
        f = 1.0 / (10.0 ** (jnp.arange(self.hidden // 2) / (self.hidden // 2)))
        a = pos[..., None].astype(jnp.float32) * f
        return jnp.concatenate([jnp.sin(a), jnp.cos(a)], -1)

    def _qkv(self, tokens, pos):
        x = self.embed[...][tokens] + self._posenc(pos)
        return x, x @ self.wq[...], x @ self.wk[...], x @ self.wv[...]

    def _attend(self, x, q, k, v, keymask):  # q [B,Q,H], k/v [B,L,H], keymask [B,Q,L]
        s = jnp.einsum("bqh,blh->bql", q, k) / self.hidden ** 0.5
        s = jnp.where(keymask, s, -1e30)
        a = jax.nn.softmax(s, -1) @ v
        return (x + a) @ self.out[...]

    # --- reference: full recompute, no cache ---
    def forward(self, tokens, mask, pos):
        """tokens/mask/pos [B, S] -> logits [B, S, V] (causal + key padding)."""
        x, q, k, v = self._qkv(tokens, pos)
        S = tokens.shape[1]
        km = jnp.tril(jnp.ones((S, S), bool))[None] & mask[:, None, :].astype(bool)
        return self._attend(x, q, k, v, km)

    def forward_np(self, tokens, pos):
        """numpy float64 reference for ONE unpadded row: tokens/pos [S] -> logits of the last position [V]."""
        E, wq, wk, wv, out = (np.asarray(p[...], np.float64) for p in (self.embed, self.wq, self.wk, self.wv, self.out))
        f = 1.0 / (10.0 ** (np.arange(self.hidden // 2) / (self.hidden // 2)))
        a = np.asarray(pos, np.float64)[:, None] * f
        x = E[np.asarray(tokens)] + np.concatenate([np.sin(a), np.cos(a)], -1)
        q, k, v = x[-1] @ wq, x @ wk, x @ wv
        s = k @ q / self.hidden ** 0.5
        w = np.exp(s - s.max())
        return (x[-1] + (w / w.sum()) @ v) @ out

    # --- rollout interface ---
    def init_cache(self, batch_size, max_len):
        z = jnp.zeros((batch_size, max_len, self.hidden), jnp.float32)
        return {"k": z, "v": z, "mask": jnp.zeros((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}

    def prefill(self, input_ids, positions, attention_mask, vision=None, *, cache):
        tokens, mask = input_ids, attention_mask.astype(bool)
        pos = positions[0]
        S = tokens.shape[1]
        x, q, k, v = self._qkv(tokens, pos)
        cache = {
            "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, 0, 1),
            "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, 0, 1),
            "mask": jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, 0, 1),
            "index": jnp.asarray(S, jnp.int32),
        }
        km = jnp.tril(jnp.ones((S, S), bool))[None] & mask[:, None, :]
        logits = self._attend(x, q, k, v, km)
        return logits[:, -1], cache

    def decode_step(self, tokens, positions, cache):
        i = cache["index"]
        x, q, k, v = self._qkv(tokens[:, None], positions[0][:, None])
        B = tokens.shape[0]
        cache = {
            "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, i, 1),
            "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, i, 1),
            "mask": jax.lax.dynamic_update_slice_in_dim(cache["mask"], jnp.ones((B, 1), bool), i, 1),
            "index": i + 1,
        }
        logits = self._attend(x, q, cache["k"], cache["v"], cache["mask"][:, None, :])
        return logits[:, 0], cache
