"""train.kind 'counting_regression': gradients reach the heads and the LoRA weights, the heads' learning rate, the
batch contract, and a two-step run through loop.train (metrics, first-step check, evaluation, final model)."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from coordexp_jax.train import config as config_lib, counting_loop as CL, optim, state as state_lib


def _cfg(tmp, **over):
    c = config_lib.base_config()
    c.name = "counting_test"
    c.train.kind = "counting_regression"
    c.model.preset = "tiny"
    c.data.kind = "synthetic"
    c.data.path = str(tmp)  # the synthetic counting set is written here
    c.data.image_size = 64
    c.data.min_objects = 1
    c.data.max_objects = 3
    c.data.num_train = 6
    c.data.num_eval = 2
    c.data.seq_len = 64
    c.data.batch_size = 2
    c.counting.template = "Count the {plural}. {marked} marked. Next: <x> <y>"
    c.counting.system_prompt = False
    c.counting.head_layers = 2
    c.counting.head_width = 16
    c.counting.max_count = 3
    c.counting.done_prob = 0.5
    c.lora.enabled = True
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.optim.lr = 1e-3
    c.train.steps = 2
    c.train.log_every = 1
    c.train.ckpt_every = 0
    c.train.progress = False
    c.train.tensorboard = False
    c.train.async_checkpoint = False
    c.eval.num_images = 2
    c.eval.num_pictures = 1
    c.eval.use_ema = False
    for k, v in over.items():
        node = c
        *head, leaf = k.split(".")
        for h in head:
            node = node[h]
        node[leaf] = v
    return config_lib.validate(c)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from coordexp_jax.train import sharding as shd

    cfg = _cfg(tmp_path_factory.mktemp("counting_data"))
    comps = CL.build_components(cfg)
    mesh = shd.make_mesh(cfg.mesh)
    graphdef, state, _, _ = state_lib.create_state(
        comps.make_model, optim.trainable_filter(cfg),
        lambda p: optim.make_optimizer(cfg, p, 2, comps.vocab_size, comps.coord_start)[0], mesh, cfg.mesh.rules, 0)
    batch = next(comps.data_iter)
    return cfg, comps, graphdef, state, batch


def test_batch_contract(setup):
    cfg, comps, _, _, batch = setup
    ids = comps.token_ids
    B = cfg.data.batch_size
    assert batch["input_ids"].shape == (B, cfg.data.seq_len)
    rows = np.arange(B)
    # the heads' positions hold <x> and <y>, <y> directly after "<x> " and is the row's last real token
    np.testing.assert_array_equal(batch["input_ids"][rows, batch["x_pos"]], ids.x_token)
    np.testing.assert_array_equal(batch["input_ids"][rows, batch["y_pos"]], ids.y_token)
    np.testing.assert_array_equal(batch["y_pos"], batch["attention_mask"].sum(-1) - 1)
    assert batch["target"].shape == (B, 2) and np.all(np.abs(batch["target"]) <= 1)
    np.testing.assert_array_equal(batch["valid"], 1.0)


def test_trainable_set_under_lora(setup):
    cfg, _, _, state, _ = setup
    names = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert any(n.startswith("regression_heads/x/") for n in names) and any(n.startswith("regression_heads/y/")
                                                                             for n in names)
    assert any(n.endswith("lora_a") for n in names)
    # LoRA freezes the base matrices: only adapters, heads and (vocabulary) coordinate rows are trainable
    assert all(optim.is_heads_param(n) or n.endswith(("lora_a", "lora_b")) or "embed_tokens" in n or "lm_head" in n
               for n in names)


def test_gradients_reach_heads_and_lora(setup):
    cfg, comps, graphdef, state, batch = setup
    jb = jax.tree.map(np.asarray, batch)
    norms = CL.gradient_norms(graphdef, state.params, state.frozen, comps.objective, jb)
    assert norms["grad_norm/heads"] > 0 and norms["grad_norm/lora"] > 0, norms
    CL.check_gradients(norms, lora=True)  # no error


def test_gradient_check_refuses_zero():
    with pytest.raises(CL.GradientFlowError, match="heads"):
        CL.check_gradients({"grad_norm/heads": 0.0, "grad_norm/lora": 1.0}, lora=True)
    with pytest.raises(CL.GradientFlowError, match="lora"):
        CL.check_gradients({"grad_norm/heads": 1.0}, lora=True)
    CL.check_gradients({"grad_norm/heads": 1.0}, lora=False)


def test_heads_get_their_own_lr():
    """First AdamW step: update = -lr * mult * g / (|g| + eps) per element, so the heads move 5x as far as a LoRA
    weight with the same gradient, and a frozen base weight not at all."""
    cfg = config_lib.base_config()
    cfg.lora.enabled = True
    cfg.optim.lr = 1e-2
    cfg.optim.schedule = "constant"
    cfg.optim.clip_norm = 0.0
    params = {"regression_heads": {"x": {"layers": {"0": {"kernel": np.zeros((3, 2), np.float32)}}}},
              "layers": {"0": {"q_proj": {"lora_a": np.zeros((3, 2), np.float32),
                                          "kernel": np.zeros((3, 2), np.float32)}}}}
    tx, _ = optim.make_optimizer(cfg, params, 10, vocab_size=100, coord_start=-1)
    g = jax.tree.map(lambda p: np.full(p.shape, 0.3, np.float32), params)
    upd, _ = tx.update(g, tx.init(params), params)
    heads = np.asarray(upd["regression_heads"]["x"]["layers"]["0"]["kernel"])
    lora = np.asarray(upd["layers"]["0"]["q_proj"]["lora_a"])
    base = np.asarray(upd["layers"]["0"]["q_proj"]["kernel"])
    # -lr * g / (|g| + eps) with eps 1e-8: -lr to float32 rounding (relative 1e-6)
    np.testing.assert_allclose(heads, -5 * 1e-2, rtol=1e-5)
    np.testing.assert_allclose(lora, -1e-2, rtol=1e-5)
    np.testing.assert_array_equal(base, 0.0)
    assert optax.global_norm(upd) > 0


def test_set_target_batch_holds_the_unmarked_centres(setup):
    from coordexp_jax.data import counting as C

    cfg = _cfg(setup[0].data.path, **{"counting.target": "set", "counting.order": "random"})
    comps = CL.build_components(cfg)
    it = comps.data_iter
    M = it.encoder.num_candidates
    assert M == it.sampler.max_objects == 3  # data.max_objects
    for _ in range(3):
        _, samples = it._draw()
        batch = it.encoder.encode_samples(samples)
        assert batch["candidates"].shape == (len(samples), M, 2)
        for b, s in enumerate(samples):
            m = int(batch["candidate_mask"][b].sum())
            assert m == (1 if s.done else s.n - s.k)
            if s.done:
                assert batch["candidates"][b, 0].tolist() == [-1.0, -1.0]
                continue
            pts = C.denormalise_points(batch["candidates"][b, :m].astype(np.float64), 64, 64)
            srt = lambda q: q[np.lexsort((q[:, 1], q[:, 0]))]  # noqa: E731
            # the unmarked centres as pixels; float32 normalised coordinates of a 64 px image: 1e-3 px is loose
            np.testing.assert_allclose(srt(pts), srt(s.ordered_points[s.k:]), atol=1e-3)
    # the ordered target adds no candidate keys (its batch is unchanged)
    assert "candidates" not in setup[4]


def test_loop_runs_counting(setup, tmp_path):
    from coordexp_jax.train import loop
    from coordexp_jax.weights.checkpoint import load_checkpoint
    from coordexp_jax.model.regression import heads_of

    # the set target with a random order: the path the demo takes (the ordered target is the fixture's)
    cfg = _cfg(setup[0].data.path, **{"counting.target": "set", "counting.order": "random"})
    res = loop.train(cfg, str(tmp_path / "run"))
    assert res["step"] == 2 and res["stop_reason"] == "steps"
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    gc = [r for r in recs if r["kind"] == "grad_check"]
    assert len(gc) == 1 and gc[0]["grad_norm/heads"] > 0 and gc[0]["grad_norm/lora"] > 0
    tr = [r for r in recs if r["kind"] == "train"]
    assert len(tr) == 2 and all(np.isfinite([r["loss/x"], r["loss/y"]]).all() for r in tr)
    assert abs(tr[-1]["loss"] - tr[-1]["loss/x"] - tr[-1]["loss/y"]) < 1e-5 * max(1.0, tr[-1]["loss"])
    ev = res["eval"]
    assert {"mae", "rmse", "hit_rate", "mean_point_error_px", "baseline_mae"} <= set(ev)
    ev_dir = tmp_path / "run" / "eval" / "step_2"
    assert sorted(os.listdir(ev_dir)) == ["count_000.png", "per_image.json"]
    per = json.load(open(ev_dir / "per_image.json"))
    assert len(per) == 2 and per[0]["picture"] == "count_000.png" and "picture" not in per[1]
    assert all(e["n_gt"] >= 1 and e["prompt"].endswith("<x> <y>") for e in per)
    out = loop.export_model(res, str(tmp_path / "final"))
    assert os.path.isfile(os.path.join(out, "regression_heads.safetensors"))
    _, m = load_checkpoint(out)
    got = nnx.state(heads_of(m), nnx.Param)
    want = res["state"].params["regression_heads"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # saved float32, restored bit-exact


def test_heads_with_point_tokens_share_one_batch_and_forward(setup):
    """`counting.point_tokens`: B counting rows then the B point-token rows of the same images; the joint
    objective's terms (one forward) equal the Stage-1 objective's on the point rows plus the heads' on the counting
    rows, each computed by its own objective with its own forward."""
    from coordexp_jax.coord import protocols
    from coordexp_jax.train.counting_objective import CountingObjective
    from coordexp_jax.train.objective import Stage1Objective

    cfg = _cfg(setup[0].data.path, **{"counting.point_tokens": True, "data.protocol": "coordjson",
                                      "data.seq_len": 128, "loss.soft_ce": 0.5, "loss.gate": 1.0})
    comps = CL.build_components(cfg)
    batch = next(comps.data_iter)
    ids, B = comps.token_ids, cfg.data.batch_size
    assert batch["input_ids"].shape == (2 * B, 128)
    np.testing.assert_array_equal(batch["valid"], [1.0] * B + [0.0] * B)
    assert np.all(batch["loss_mask"][:B] == 0) and np.all(batch["loss_mask"][B:].sum(-1) > 0)
    rows = np.arange(B)
    np.testing.assert_array_equal(batch["input_ids"][rows, batch["x_pos"][:B]], ids.x_token)
    np.testing.assert_array_equal(batch["input_ids"][rows, batch["y_pos"][:B]], ids.y_token)
    # the point rows answer the counting task for the records of the counting rows (same images, same counts)
    sampler = comps.data_iter.sampler
    it = CL.CountingWithPointsBatches(sampler, comps.data_iter.encoder, comps.data_iter.point_encoder,
                                      comps.data_iter.collator, B, seed=cfg.data.seed)
    idx, samples = it._draw()
    tok = comps.extra["encoder"].tok
    for b, s in enumerate(samples):
        answer = batch["targets"][B + b][batch["loss_mask"][B + b] > 0][:-1]  # the answer tokens, <|im_end|> off
        parsed = protocols.parse_count(answer, tok, ids)
        assert len(parsed.points) == s.n == parsed.count
    model = comps.make_model()
    jb = jax.tree.map(np.asarray, batch)
    joint = comps.objective.sums(model, jb)
    s1 = Stage1Objective.from_config(cfg.loss, ids.coord_start, comps.model_config.vocab_size).sums(model, jb)
    hd = CountingObjective.from_config(cfg).sums(model, jb)
    assert set(joint) == set(s1) | {"x", "y"}
    for k, v in {**s1, **hd}.items():
        # the same float32 graph twice: equal up to XLA fusion differences (relative 1e-5 of the term)
        np.testing.assert_allclose(float(joint[k]), float(v), rtol=1e-5, atol=1e-6)
    counts = comps.objective.counts(jb)
    assert float(counts["x"]) == B and float(counts["ce"]) == float(jb["loss_mask"].sum() - (
        jb["coord_mask"].sum()))


def test_qk_scale_multiplies_attention_logits():
    """`counting.qk_scale` (`scale_attention_logits`): Qwen3 RMS-normalises q and k per head, so scaling every
    language-model q_norm scale by f multiplies each attention logit q.k / sqrt(hd) by f (k untouched: not f^2).
    Checked on the layer's own normalised q and k against numpy logits."""
    from coordexp_jax.model.config import tiny_config
    from coordexp_jax.model.qwen3vl import Qwen3VL

    model = Qwen3VL(tiny_config(), rngs=nnx.Rngs(0))
    attn = model.language_model.layers[1].self_attn
    hd = attn.q_norm.scale[...].shape[-1]
    x = np.random.default_rng(0).normal(size=(5, hd)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(7, hd)).astype(np.float32)

    def logits():
        return np.asarray(attn.q_norm(x)) @ np.asarray(attn.k_norm(y)).T / np.sqrt(hd)

    before = logits()
    CL.scale_attention_logits(model, 2.5)
    # float32 RMSNorm then a 16-term dot product: relative 1e-5 of the logits' scale on any x86 CPU
    np.testing.assert_allclose(logits(), 2.5 * before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    for i in range(len(model.language_model.layers)):  # every layer, not only the one checked
        assert not np.allclose(np.asarray(model.language_model.layers[i].self_attn.q_norm.scale[...]), 1.0)


@pytest.mark.parametrize("over, key", [({"counting.order": "random"}, "counting.order"),
                                       ({"counting.set_band": 0.1}, "counting.set_band"),
                                       ({"counting.template": "Count the {plural}."}, "counting.template")])
def test_bad_counting_combination_names_its_key(tmp_path, over, key):
    from coordexp_jax.train.config import ConfigError

    cfg = _cfg(tmp_path, **over)
    with pytest.raises(ConfigError, match=f"^config key '{key}': SequentialCountingConfig"):
        CL.sequential_config(cfg)
