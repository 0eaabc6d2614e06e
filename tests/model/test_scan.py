"""Scanned layers (ModelConfig.scan_layers) against the per-layer loop on the tiny config: the same parameters
(stacked) give the same logits and gradients with images (ViT + DeepStack), with remat policies, with LoRA
adapters, and through prefill + KV-cache decoding; the 'layers' axis is never sharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from _prompts import make_batch
from coordexp_jax.model.config import ConfigError, tiny_config
from coordexp_jax.model.inputs import build_model_inputs
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.model.scan import stack_pure, unstack_pure
from coordexp_jax.model.sharding import logical_partition_specs
from coordexp_jax.train import lora as lora_lib

# Loop and scan run the same float32 ops; XLA fuses them differently inside the while body, so results differ by
# float32 rounding only (seen <= 5e-7 of the largest |value| on AVX2 and AVX-512). A wrong layer order, a missing
# DeepStack add or a stale cache slot changes them by > 1e-2 of it.
REL = 2e-5


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max()
    assert err <= REL * max(np.abs(want).max(), 1e-12), (what, err, np.abs(want).max())


def _tree_close(got, want, what):
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    assert flat_w.keys() == flat_g.keys(), what
    for k in flat_w:
        _close(flat_g[k], flat_w[k], f"{what} {jax.tree_util.keystr(k)}")


def _perturb(model, seed):
    """Every parameter += N(0, 0.05^2): norms, biases and layers all differ, so a mixed-up layer shows."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                for x, k in zip(leaves, keys)]))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    loop = Qwen3VL(cfg, rngs=nnx.Rngs(1))
    scan = Qwen3VL(cfg.replace(scan_layers=True), rngs=nnx.Rngs(1))
    # same seed -> the same values, stacked
    _tree_close(nnx.to_pure_dict(nnx.state(scan, nnx.Param)), stack_pure(nnx.to_pure_dict(nnx.state(loop, nnx.Param))),
                "init")
    _perturb(loop, 7)
    nnx.update(scan, stack_pure(nnx.to_pure_dict(nnx.state(loop, nnx.Param))))
    rows = [[5, ("img", (1, 4, 4)), 7], [3, ("img", (1, 4, 8)), 2]]
    ids, mask, items = make_batch(cfg, np.random.default_rng(0), rows)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    batch = {k: jnp.asarray(v) for k, v in inp.items() if k != "rope_deltas"}
    return cfg, loop, scan, batch


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_grads(graphdef, params, rest, batch):
    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        vision = batch if "visual_index" in batch else None
        logits = m.lm_logits(m(batch["input_ids"], batch["positions"], batch["attention_mask"], vision))
        logits = logits[..., : m.config.vocab_size]
        w = jnp.sin(jnp.arange(logits.shape[-1], dtype=jnp.float32))  # a loss that weighs every logit differently
        return jnp.sum(logits * w * batch["attention_mask"][..., None]), logits

    return jax.grad(loss, has_aux=True)(params)


def _run(model, batch, wrt=nnx.Param):
    graphdef, params, rest = nnx.split(model, wrt, ...)
    grads, logits = _logits_and_grads(graphdef, params, rest, batch)
    return np.asarray(logits), nnx.to_pure_dict(grads)


def test_forward_and_grads_with_images(setup):
    """Scan with remat (policy dots_saveable, decoder layers and ViT blocks) against the plain loop. The scan
    without remat is compared in the LoRA and decode tests."""
    cfg, loop, scan, batch = setup
    remat = Qwen3VL(cfg.replace(scan_layers=True, remat_policy="dots_saveable"), rngs=nnx.Rngs(0), remat=True)
    nnx.update(remat, nnx.state(scan, nnx.Param))
    # the remat model really runs two scans (ViT, decoder) of checkpointed steps with the named policy
    g, p, r = nnx.split(remat, nnx.Param, ...)
    jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(g, p, r)(batch["input_ids"], batch["positions"],
                                                            batch["attention_mask"], batch))(p))
    assert jaxpr.count("scan[") == 2 and jaxpr.count("remat2[") == 2 and "DotsSaveable" in jaxpr
    logits_l, grads_l = _run(loop, batch)
    logits_s, grads_s = _run(remat, batch)
    valid = np.asarray(batch["attention_mask"], bool)
    _close(logits_s[valid], logits_l[valid], "logits")
    _tree_close(grads_s, stack_pure(grads_l), "grads")
    # the ViT and DeepStack really contribute: their gradients are not zero
    assert np.abs(np.asarray(grads_s["visual"]["blocks"]["attn"]["qkv"]["kernel"])).max(axis=(1, 2)).min() > 0
    assert all(np.abs(np.asarray(grads_s["visual"]["deepstack_merger_list"][k]["linear_fc2"]["kernel"])).max() > 0
               for k in range(2))


def test_unknown_remat_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="remat_policy"):
        tiny_config().replace(remat_policy="dots")


def test_lora_on_stacked_kernels(setup):
    cfg, loop, scan, batch = setup
    loop, scan = nnx.clone(loop), nnx.clone(scan)  # the fixture's models stay without adapters
    targets = ("q_proj", "v_proj", "down_proj")
    assert lora_lib.apply_lora(loop, targets, 4, 8.0, nnx.Rngs(3)) == 3 * cfg.text.num_hidden_layers
    assert lora_lib.apply_lora(scan, targets, 4, 8.0, nnx.Rngs(3)) == 3  # one stacked module per target
    a = scan.language_model.layers.self_attn.q_proj.lora_a
    assert a[...].shape == (cfg.text.num_hidden_layers, cfg.text.hidden_size, 4)
    assert a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    _perturb(loop, 5)  # B != 0, so the adapters change the output
    nnx.update(scan, stack_pure(nnx.to_pure_dict(nnx.state(loop, nnx.Param))))
    text = {k: batch[k] for k in ("input_ids", "positions", "attention_mask")}  # text only: the adapters are there
    logits_l, grads_l = _run(loop, text, wrt=nnx.LoRAParam)
    logits_s, grads_s = _run(scan, text, wrt=nnx.LoRAParam)
    valid = np.asarray(batch["attention_mask"], bool)
    _close(logits_s[valid], logits_l[valid], "lora logits")
    _tree_close(grads_s, stack_pure(grads_l), "lora grads")
    # merging folds W + scale A @ B per layer in both layouts
    lora_lib.merge_lora(loop)
    assert lora_lib.merge_lora(scan) == 3
    _tree_close(nnx.to_pure_dict(nnx.state(scan, nnx.Param)), stack_pure(nnx.to_pure_dict(nnx.state(loop, nnx.Param))),
                "merged")


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, batch):
    m = nnx.merge(graphdef, state)
    return m.prefill(batch["input_ids"], batch["positions"], batch["attention_mask"], batch,
                     cache_len=batch["input_ids"].shape[1] + 4)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).decode_step(tokens, None, cache)


def test_kv_cache_decode(setup):
    """Prefill with images (DeepStack) and three greedy decode steps: same logits, same cache contents."""
    cfg, loop, scan, batch = setup
    out = {}
    for name, m in (("loop", loop), ("scan", scan)):
        g, s = nnx.split(m)
        logits, cache = _prefill(g, s, batch)
        steps = [np.asarray(logits)]
        tok = jnp.argmax(logits[:, : cfg.vocab_size], -1).astype(jnp.int32)
        for _ in range(3):
            logits, cache = _decode(g, s, tok, cache)
            steps.append(np.asarray(logits))
            tok = jnp.argmax(logits[:, : cfg.vocab_size], -1).astype(jnp.int32)
        out[name] = (steps, cache)
    (steps_l, cache_l), (steps_s, cache_s) = out["loop"], out["scan"]
    assert cache_s["k"].shape == (cfg.text.num_hidden_layers,) + cache_l["k"][0].shape  # [L, B, nkv, T, hd]
    for i, (a, b) in enumerate(zip(steps_s, steps_l)):
        _close(a[:, : cfg.vocab_size], b[:, : cfg.vocab_size], f"step {i} logits")
    for key in ("k", "v"):
        _close(cache_s[key], np.stack([np.asarray(x) for x in cache_l[key]]), f"cache {key}")
    for key in ("mask", "index", "next_pos"):
        np.testing.assert_array_equal(np.asarray(cache_s[key]), np.asarray(cache_l[key]))


def test_layers_axis_never_sharded():
    from coordexp_jax.train.config import DEFAULT_RULES
    from coordexp_jax.train.sharding import make_mesh, resolve_spec

    abstract = nnx.eval_shape(lambda: Qwen3VL(tiny_config().replace(scan_layers=True)))
    specs = nnx.to_flat_state(logical_partition_specs(nnx.state(abstract, nnx.Param)))
    flat = {p: tuple(v.get_value() if hasattr(v, "get_value") else v) for p, v in specs}
    assert flat[("language_model", "layers", "self_attn", "k_proj", "kernel")] == ("layers", "embed", "kv_heads")
    assert flat[("visual", "blocks", "attn", "qkv", "kernel")] == ("layers", "vision_embed", "vision_mlp")
    assert flat[("language_model", "embed_tokens", "embedding")] == ("vocab", "embed")
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    # 'layers' needs no rule and maps to no mesh axis, even if a rule table names it
    rules = DEFAULT_RULES + (("layers", "fsdp"),)
    assert resolve_spec(P("layers", "embed", "kv_heads"), (3, 64, 32), mesh, rules) == P(None, None, None)


def test_unstack_inverts_stack(setup):
    _, loop, _, _ = setup
    pure = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
    _tree_close(unstack_pure(stack_pure(pure)), pure, "round trip")


def test_sampler_rollout_scan_equals_loop():
    """The sampler's decode loop with scanned layers (the stacked layers sliced once outside the loop,
    `model.scan.unstack_module`) generates what the per-layer model generates: same greedy tokens, log-probs
    within float32 rounding."""
    from coordexp_jax.data.tokenizer import TokenIds
    from coordexp_jax.rollout.sampler import Sampler, SamplerConfig

    cfg = tiny_config()
    loop = Qwen3VL(cfg, rngs=nnx.Rngs(3))
    _perturb(loop, 11)
    scan = Qwen3VL(cfg.replace(scan_layers=True), rngs=nnx.Rngs(3))
    nnx.update(scan, stack_pure(nnx.to_pure_dict(nnx.state(loop, nnx.Param))))
    rows = [[5, ("img", (1, 4, 4)), 7], [3, ("img", (1, 4, 8)), 2]]
    ids, mask, items = make_batch(cfg, np.random.default_rng(4), rows)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    tid = TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=-1,
                   vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id,
                   image_pad=cfg.image_token_id, video_pad=cfg.video_token_id, coord_wildcard=399, coord_start=400,
                   num_bins=500)
    out = {name: Sampler(m, tid, SamplerConfig(max_new_tokens=10)).generate(inp)
           for name, m in (("loop", loop), ("scan", scan))}
    np.testing.assert_array_equal(out["scan"].tokens, out["loop"].tokens)
    _close(out["scan"].logprobs, out["loop"].logprobs, "log-probs")
