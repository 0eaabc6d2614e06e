"""The GRPO loop on the tiny Qwen3-VL (train/grpo_loop.py): teacher-forced completion rows against the sampler,
the reference (starting weights; with LoRA the base model with adapters off), mu = 2 with old log-probs recorded
before the first update, two steps end to end through `python -m coordexp_jax.train`'s loop, restart = uninterrupted.

A random tiny model's answers never parse, so every real reward is 0 and every advantage 0. The update tests give
each completion a reward computed from its token ids instead (`_varied_rewards`), so that advantages are non-zero
and the updates move the weights.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordexp_jax.coord import protocols
from coordexp_jax.rl import rewards as rl_rewards
from coordexp_jax.train import build, config as C, grpo_loop as GL, loop, stage2


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """The loop runs below compile the same programs again (each run builds its own jitted functions): a persistent
    compilation cache, for this module only, compiles each once (about 2.5x faster on 2 cores)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(k, v)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _cfg(tmp, **kw):
    cfg = C.base_config()
    cfg.train.kind = "grpo"
    cfg.data.path = str(tmp)
    cfg.data.synthetic_task = "grounding"
    cfg.data.num_train, cfg.data.num_eval, cfg.data.batch_size, cfg.data.max_objects = 8, 2, 2, 2
    cfg.data.image_size, cfg.data.protocol, cfg.data.seq_len = 64, "tags", 128
    cfg.grpo.num_generations, cfg.grpo.max_new_tokens = 2, 8
    cfg.grpo.rewards.multi_box_format = cfg.grpo.rewards.multi_gaussian_point = 0.0
    cfg.grpo.rewards.multi_gaussian_plane = 0.0
    cfg.grpo.rewards.format, cfg.grpo.rewards.gaussian_plane = 1.0, 1.0
    cfg.grpo.beta = 0.04
    cfg.optim.lr, cfg.optim.schedule = 3e-2, "constant"
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = 2, 1, 0
    cfg.train.progress = cfg.train.tensorboard = cfg.train.async_checkpoint = False
    cfg.eval.num_images, cfg.eval.max_new_tokens, cfg.eval.at_end = 2, 8, False
    for k, v in kw.items():
        node = cfg
        *head, leaf = k.split(".")
        for h in head:
            node = node[h]
        node[leaf] = v
    return C.validate(cfg)


@pytest.mark.parametrize("key, value, match", [
    ("grpo.bogus", 1, "unknown config key 'grpo.bogus'"),
    ("grpo.rewards.gaussian_plain", 1.0, "unknown config key 'grpo.rewards.gaussian_plain'.*gaussian_plane"),
    ("grpo.rewards.format", -1.0, "'grpo.rewards.format' = -1.0 is out of range"),
    ("grpo.num_generations", 1, "'grpo.num_generations' = 1 is out of range"),
    ("grpo.advantage", "ppo", "'grpo.advantage' = 'ppo' is out of range"),
    ("grpo.aggregation", "sum", "'grpo.aggregation' = 'sum' is out of range"),
    ("grpo.protocol", "yaml", "'grpo.protocol' = 'yaml' is out of range"),
    ("grpo.epsilon_high", 0.1, "'grpo.epsilon_high' = 0.1 must be >= grpo.epsilon"),
    ("stage2.ratio", 0.5, "'stage2.ratio' must be 0 with train.kind='grpo'"),
    ("train.kind", "ppo", "'train.kind' = 'ppo' is out of range"),
])
def test_grpo_config_errors_name_the_key(key, value, match):
    cfg = C.base_config()
    cfg.train.kind = "grpo"
    node = cfg
    *head, leaf = key.split(".")
    for h in head:
        node = node[h]
    node[leaf] = value
    with pytest.raises(C.ConfigError, match=match):
        C.validate(cfg)


def test_grpo_protocol_sets_the_data_protocol_and_all_zero_rewards_fail():
    cfg = C.base_config()
    cfg.train.kind, cfg.grpo.protocol = "grpo", "tags"
    assert C.validate(cfg).data.protocol == "tags"
    for k in cfg.grpo.rewards:
        cfg.grpo.rewards[k] = 0.0
    with pytest.raises(C.ConfigError, match="every reward weight is 0"):
        C.validate(cfg)


def _varied_rewards(monkeypatch):
    """Rewards in [0, 1) from a checksum of each completion's token ids (the real ones are all 0 here)."""
    parse = protocols.parse

    def parse_keeping_ids(ids, *a, **k):
        p = parse(ids, *a, **k)
        p.test_ids = [int(t) for t in ids]
        return p

    def rewards(preds, gts, weights):
        r = np.array([zlib.crc32(np.asarray(p.test_ids, np.int64).tobytes()) % 1000 / 1000 for p in preds])
        return r, {"checksum": r}

    monkeypatch.setattr(protocols, "parse", parse_keeping_ids)
    monkeypatch.setattr(rl_rewards, "compute_rewards", rewards)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """build_parts with mu = 2 and beta > 0, and one rollout batch (G = 4) of the starting weights."""
    cfg = _cfg(tmp_path_factory.mktemp("syn"), **{"grpo.mu": 2, "grpo.num_generations": 4})
    comps = build.build_components(cfg)
    parts = GL.build_parts(cfg, comps)
    data = next(comps.data_iter)
    with pytest.MonkeyPatch.context() as mp:
        _varied_rewards(mp)
        micro, host = parts.runner.rollout([data], parts.state.params, parts.state.frozen, 0)
    return cfg, comps, parts, data, micro, host


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_completion_rows_reproduce_the_sampler(setup):
    """The teacher-forced rows (prompt + completion at rope positions n_valid + k + rope_delta) give the log-probs
    the sampler recorded while decoding with its KV cache: two independent paths through the model."""
    cfg, comps, parts, data, micro, host = setup
    G, B = 4, data["input_ids"].shape[0]
    mb = micro[0]
    T = mb["completion"].shape[1]
    L = mb["input_ids"].shape[1] - T
    assert mb["input_ids"].shape[0] == B * G and mb["advantages"].shape == (B * G,)
    # rows b*G .. b*G+G-1 share prompt b; the image slots are not repeated
    np.testing.assert_array_equal(mb["input_ids"][:G, :L], np.repeat(mb["input_ids"][:1, :L], G, 0))
    assert mb["pixel_values"].shape[0] == B
    # the same rollout again (same key): the sampler's log-probs at temperature 1 (= the sampling temperature)
    prompts = GL.bucket_inputs(GL.repeat_prompts(stage2.left_padded_prompts(data, comps.token_ids.pad), G),
                               pad_id=comps.token_ids.pad, min_prompt_len=L, bucket_batch=False)[0]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), 0), 0)
    ro = parts.runner.sampler.generate(prompts, key=key)
    m = mb["completion_mask"] > 0
    np.testing.assert_array_equal(ro.tokens[:, :T][m], mb["completion"][m])
    np.testing.assert_array_equal(m.sum(1), ro.lengths)
    lp = np.asarray(GL.make_logp_fn(parts.graphdef, 1.0, 4)(parts.state.params, parts.state.frozen,
                                                            parts.to_device(micro)))[0]
    # float32 teacher-forced forward vs KV-cache decode: log-probs near -7 agree to ~1e-5 (summation order only)
    np.testing.assert_allclose(lp[m], ro.logprobs[:, :T][m], rtol=0, atol=2e-4)


def _np_grpo(lp, old, ref, adv, mask, eps, beta):
    """The GRPO loss in numpy (DeepSeekMath form, `seq_mean_token_mean`): PPO-clip + beta * k3 KL, token mean
    per completion, mean over completions."""
    lp, old, ref, m = (np.asarray(x, np.float64) for x in (lp, old, ref, mask))
    a = np.asarray(adv, np.float64)[:, None]
    ratio = np.exp(lp - old)
    pg = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    d = ref - lp
    per_tok = pg + beta * (np.exp(d) - d - 1)
    return float(np.mean((per_tok * m).sum(1) / m.sum(1)))


def test_mu2_uses_old_logprobs_from_before_the_first_update_and_kl_starts_at_0(setup):
    cfg, comps, parts, data, micro, host = setup
    assert host["frac_reward_zero_std"] < 1.0 and np.abs(micro[0]["advantages"]).max() > 0.1
    batch = parts.to_device(micro)
    s0 = _copy(parts.state)
    lp0 = parts.old_fn(s0.params, s0.frozen, batch)
    ref0 = parts.ref_fn(s0.params, s0.frozen, batch, parts.reference.store)
    # The reference is the starting weights: KL 0 at the start (two jitted forwards of the same weights).
    np.testing.assert_allclose(np.asarray(ref0), np.asarray(lp0), rtol=0, atol=1e-6)
    # theta_1: the first update alone
    s1, _ = parts.step_fn(_copy(s0), dict(batch, old_logp=lp0, ref_logp=ref0))
    lp1 = parts.old_fn(s1.params, s1.frozen, batch)
    _, ms = parts.update(_copy(s0), batch)
    assert len(ms) == 2 and ms[0]["loss/kl"] < 1e-7
    adv, mask = micro[0]["advantages"], micro[0]["completion_mask"]
    want = _np_grpo(lp1[0], lp0[0], lp0[0], adv, mask, cfg.grpo.epsilon, cfg.grpo.beta)
    stale = _np_grpo(lp1[0], lp1[0], lp0[0], adv, mask, cfg.grpo.epsilon, cfg.grpo.beta)  # old re-recorded
    # float32 forwards of a loss of magnitude ~1: 1e-4 covers their rounding; the two readings differ by far more
    assert abs(want - stale) > 1e-2
    assert ms[1]["loss"] == pytest.approx(want, abs=1e-4)
    assert ms[1]["loss/ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert ms[1]["loss/kl"] > 0


def test_lora_reference_is_the_base_model_with_adapters_off(setup):
    """With LoRA the reference keeps only the coordinate rows (the trainable part of the base weights) and turns the
    adapters off: after the adapters and the coordinate rows moved, its log-probs are those of the plain model."""
    from coordexp_jax.data.tokenizer import NUM_BINS
    from coordexp_jax.train import optim

    cfg, comps, parts, data, micro, host = setup
    mc, ids = comps.model_config, comps.token_ids
    lcfg = C.validate(_cfg("unused", **{"lora.enabled": True, "lora.rank": 4}))
    gd, params, frozen = nnx.split(build.make_model_fn(lcfg, mc, ids)[0](), optim.trainable_filter(lcfg), ...)
    ref = GL.Reference.from_params(lcfg, params, comps.vocab_size, comps.coord_start)
    H = mc.text.hidden_size
    assert ref.store and all(NUM_BINS in v.shape and v.size == NUM_BINS * H for v in ref.store.values())
    rng = np.random.default_rng(0)

    def move(path, x):
        p = optim.path_str(path)
        if p.endswith(("lora_a", "lora_b")):
            return x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        return x.at[ids.coord_start:ids.coord_start + NUM_BINS].add(jnp.asarray(rng.normal(0, 0.3, (NUM_BINS, H)), x.dtype))

    moved = jax.tree_util.tree_map_with_path(move, params)
    logp = jax.jit(lambda p, f, b: GL.completion_logprobs(nnx.merge(gd, p, f), b, 1.0, 4))
    b = {k: jnp.asarray(v) for k, v in micro[0].items()}
    gd_p, st_p = nnx.split(build.make_model_fn(cfg, mc, ids)[0]())  # the same seed without LoRA: the base model
    want = np.asarray(jax.jit(lambda s, b: GL.completion_logprobs(nnx.merge(gd_p, s), b, 1.0, 4))(st_p, b))
    got = np.asarray(logp(ref.params(moved), frozen, b))
    trained = np.asarray(logp(moved, frozen, b))
    m = micro[0]["completion_mask"] > 0
    # the same float32 forward of the same weights (adapter path adds exact zeros): rounding only
    np.testing.assert_allclose(got[m], want[m], rtol=0, atol=1e-5)
    assert np.abs(trained[m] - want[m]).max() > 1e-2  # the moved policy differs: the check can fail


KEYS = ("reward", "reward_std", "rewards/checksum/mean", "rewards/checksum/std", "frac_reward_zero_std", "kl",
        "clip_fraction", "entropy", "completion_length", "parse_rate", "rollout_s", "reward_s", "update_s", "loss",
        "grad_norm", "lr")


def test_two_steps_end_to_end_and_restart_resumes(tmp_path, monkeypatch):
    """`loop.train` with train.kind 'grpo': two steps (rollout, rewards, update) log every metric, finite; the sampler
    and the update compile once; KL is 0 at the first step (reference = starting weights) and positive after an
    update; the held-out evaluation reports reward, parse rate and Acc@0.5. A run stopped after one step and
    restarted ends with the weights and metrics of the uninterrupted run. The export CLI reads the run; an SFT
    run in its workdir is refused."""
    _varied_rewards(monkeypatch)
    cfg = _cfg(tmp_path / "syn", **{"eval.at_end": True})
    res = loop.train(cfg, str(tmp_path / "a"))
    assert res["step"] == res["steps_run"] == 2 and res["stop_reason"] == "steps"
    assert res["compiles"] == 1 and res["sampler_compiles"] == 2
    tr = loop.read_metrics(str(tmp_path / "a"))
    assert sorted(tr) == [1, 2]
    for s in (1, 2):
        assert all(np.isfinite(tr[s][k]) for k in KEYS), {k: tr[s].get(k) for k in KEYS}
    assert tr[1]["kl"] < 1e-7 < tr[2]["kl"]
    assert tr[1]["frac_reward_zero_std"] < 1.0 and tr[1]["rollout_s"] > 0
    ev = loop.read_metrics(str(tmp_path / "a"), kind="eval")[2]
    assert {"reward", "parse_rate", "acc@0.5", "num_records"} <= set(ev)

    cfg_b = _cfg(tmp_path / "syn")
    assert loop.train(cfg_b, str(tmp_path / "b"), stop_after=1)["step"] == 1
    res_b = loop.train(cfg_b, str(tmp_path / "b"))
    assert res_b["step"] == 2
    # The same programs on the same inputs in one process: the resumed run is bitwise the uninterrupted one; 1e-6
    # leaves room for a different XLA fusion choice only.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6),
                 res["state"].params, res_b["state"].params)
    tb = loop.read_metrics(str(tmp_path / "b"))
    for k in ("reward", "kl", "loss", "completion_length"):
        assert tb[2][k] == pytest.approx(tr[2][k], abs=1e-6)

    # `python -m coordexp_jax.train.export` reads a GRPO run's checkpoint; an SFT run in its workdir is refused
    from coordexp_jax.train import checkpoint, export

    _, model, step = export.load_trained_model(str(tmp_path / "a"))
    assert step == 2
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 nnx.state(model, nnx.Param), res["state"].params)
    sft = _cfg(tmp_path / "syn", **{"train.kind": "sft"})
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="train_kind"):
        loop.train(sft, str(tmp_path / "a"))


def test_ground_truth_reads_the_rows_answers(tmp_path):
    """The ground truth of each row is its record's objects in answer order: the continuous boxes where the row has
    box slots, the emitted bins (k / 999) beyond `max_objects`."""
    from coordexp_jax.coord import codec
    from coordexp_jax.data import prompts, records, synthetic
    from coordexp_jax.data.image import ImageConfig
    from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer

    scfg = synthetic.SyntheticConfig(image_size=(64, 64), min_objects=3, max_objects=3, clutter=0)
    recs, _ = records.read_jsonl(synthetic.write_split(str(tmp_path), "train", 2, seed=3, cfg=scfg)["jsonl"])
    tok = small_tokenizer()
    ids = token_ids_from_tokenizer(tok)
    pcfg = prompts.PromptConfig(protocol="tags", image=ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64),
                                max_objects=2, text_bucket=128)
    enc = prompts.SampleEncoder(pcfg, tokenizer=tok)
    batch = prompts.Collator(pcfg, ids, prompts.released_model_config(pcfg, ids))([enc(r) for r in recs])
    got = GL.ground_truth(batch, tok, ids, "tags")
    for r, g in zip(recs, got):
        order = protocols.object_order(codec.box_to_bins(r.boxes()))  # the answer's (sorted) order
        assert [d for d, _ in g] == [r.objects[i].desc for i in order]
        want = r.boxes()[order]
        # two box slots: the record's boxes (float32 slots: 1e-7 on [0, 1]); the third: its bins / 999 (<= 0.5 bin)
        np.testing.assert_allclose(np.array([b for _, b in g[:2]]), want[:2], rtol=0, atol=1e-6)
        np.testing.assert_allclose(g[2][1], codec.bins_to_box(codec.box_to_bins(want[2])), rtol=0, atol=1e-12)
        assert np.abs(g[2][1] - want[2]).max() <= 0.5 / 999 + 1e-9
    # qwen_text writes the coordinates as text on Qwen's 0..1000 grid and gets no box slots: the boxes as written
    pcfg = dataclasses.replace(pcfg, protocol="qwen_text", text_bucket=256)
    enc = prompts.SampleEncoder(pcfg, tokenizer=tok)
    batch = prompts.Collator(pcfg, ids, prompts.released_model_config(pcfg, ids))([enc(r) for r in recs])
    assert not batch["box_valid"].any()
    for r, g in zip(recs, GL.ground_truth(batch, tok, ids, "qwen_text")):
        assert sorted(d for d, _ in g) == sorted(o.desc for o in r.objects)
        for d, b in g:  # q / 1000 of the rounded integers: within half a grid step of the record's box
            assert min(np.abs(b - np.asarray(o.box)).max() for o in r.objects if o.desc == d) <= 0.5 / 1000 + 1e-9
