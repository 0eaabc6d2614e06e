"""Stage-2 and GRPO across two processes (`jax.distributed` on localhost, one CPU device each) agree with one process
on the same global batch: the rollouts of every row, the Stage-2 metrics, GRPO's rewards, advantages and logged
metrics, the losses and the trained parameters; and the multi-host helpers (`rollout/multihost.py`) on one process.
The same three subprocesses (the one-process reference and the pair) run Stage-2 and then GRPO."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_stage2_multiproc_check.py")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), env.get("PYTHONPATH", "")])
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2mp")
    data = str(root / "data")
    # the synthetic set first, then the one-process reference and the two processes side by side (3 processes on
    # 2 cores: mostly compiling, ~3 min)
    prep = subprocess.run([sys.executable, SCRIPT, data, "--prepare"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    port = _free_port()
    # each run compiles its model init once (GRPO's is Stage-2's program) through a persistent compilation cache (in
    # the pair process 0 writes it, both read it)
    one_env = dict(_env(), JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache_one"))
    procs = [subprocess.Popen([sys.executable, SCRIPT, data, str(root / "one")], env=one_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    for pid in range(2):
        env = _env()
        env.update(COORDEXP_COORDINATOR=f"127.0.0.1:{port}", COORDEXP_NUM_PROCESSES="2", COORDEXP_PROCESS_ID=str(pid),
                   JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache_two"))
        procs.append(subprocess.Popen([sys.executable, SCRIPT, data, str(root / "two")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    load = lambda d, i: json.load(open(root / d / f"result_{i}.json"))  # noqa: E731
    npz = lambda d, name: dict(np.load(root / d / f"{name}.npz"))  # noqa: E731
    return (load("one", 0), [load("two", 0), load("two", 1)], npz("one", "params"), npz("two", "params"),
            {d: {n: npz(d, n) for n in ("params_grpo", "params_grpo_start")} for d in ("one", "two")})


def test_two_process_rollouts_are_the_rows_of_the_one_process_rollout(runs):
    one, two, _, _, _ = runs
    assert (one["processes"], two[0]["processes"], two[0]["devices"]) == (1, 2, 2)
    assert len(one["rollouts"]) == len(two[0]["rollouts"]) == len(two[1]["rollouts"]) == 3  # 3 rollout steps
    for step in range(3):
        ref = one["rollouts"][step]
        got = {k: two[0]["rollouts"][step][k] + two[1]["rollouts"][step][k] for k in ref}  # process 0's rows first
        assert got["lengths"] == ref["lengths"] and got["tokens"] == ref["tokens"]  # greedy: the same token ids
        # model log-probs of the emitted tokens (float32, |logp| <~ 10): the same math on another device layout
        # (per-device partial sums, all-reduces) differs by float32 rounding, ~1e-6 relative; a row that saw the
        # wrong image features or positions would differ by >1e-2
        np.testing.assert_allclose(got["logprobs"], ref["logprobs"], rtol=1e-4, atol=1e-4)


def test_two_process_stage2_losses_metrics_and_params_agree_with_one(runs):
    one, two, p1, p2, _ = runs
    assert len(one["stage2"]) == len(two[0]["stage2"]) == 3
    for a, b in zip(one["stage2"], two[0]["stage2"]):
        assert a["stage2/matched"] > 0 and a["stage2/parse_rate"] == 1.0  # the rewritten rows really are used
        assert set(a) == set(b)
        for k in a:  # per-row means / counts over the same rows: equal up to float32 averaging
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    # float32 losses of the same global batch summed in another order: ~1e-7 relative (seen ~1e-7)
    np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=2e-5)
    # 3 AdamW steps with eps = 1 (update ~ lr * gradient, so a gradient's rounding difference stays that small):
    # each parameter within 2e-5 of its largest entry (parameters ~0.02..1; the gradients agree to ~1e-6 relative)
    assert set(p1) == set(p2)
    for k in p1:
        a, b = p1[k].astype(np.float64), p2[k].astype(np.float64)
        assert np.max(np.abs(a - b)) <= 2e-5 * max(np.max(np.abs(a)), 1e-6), k


def test_helpers_on_one_process_are_the_identity():
    import jax

    from coordexp_jax.rollout import multihost
    from coordexp_jax.train import sharding as shd

    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    b = {"visual_index": np.array([[-1, 0, 1]]), "pixel_values": np.zeros((1, 8, 3))}
    assert np.array_equal(multihost.offset_visual_index(b, mesh, 2)["visual_index"], b["visual_index"])
    assert multihost.allgather_ints([3, 4]).tolist() == [[3, 4]]
    g = multihost.put_global({"input_ids": np.arange(6).reshape(2, 3), "positions": np.zeros((3, 2, 3))}, mesh)
    assert g["input_ids"].shape == (2, 3) and g["positions"].shape == (3, 2, 3)
    assert np.array_equal(multihost.local_rows(g["input_ids"], mesh), np.arange(6).reshape(2, 3))


def test_two_process_grpo_agrees_with_one(runs):
    """2 GRPO steps (G = 2 samples per prompt at temperature 1, the KL term on): the pair's global sampled rollout,
    per-row rewards and group advantages, logged metrics and trained parameters equal the one-process run's."""
    one, two, _, _, grpo = runs
    g1, g2 = one["grpo"], [two[0]["grpo"], two[1]["grpo"]]
    assert len(g1["rollouts"]) == len(g2[0]["rollouts"]) == len(g2[1]["rollouts"]) == 2  # 2 steps, 1 micro-batch
    for step in range(2):
        ref = g1["rollouts"][step]
        got = {k: g2[0]["rollouts"][step][k] + g2[1]["rollouts"][step][k] for k in ref}  # process 0's rows first
        # sampled at temperature 1 with one key: the same categorical draws per global row (threefry is
        # partitionable), so the same token ids unless float32 rounding flips a near-tie (not on this model)
        assert got["lengths"] == ref["lengths"] and got["tokens"] == ref["tokens"]
        # as for Stage-2: float32 log-probs (|logp| <~ 10) on another layout differ by rounding, ~1e-6 relative
        np.testing.assert_allclose(got["logprobs"], ref["logprobs"], rtol=1e-4, atol=1e-4)
        # rewards and advantages: host float64 / float32 math on the same token ids and ground truth, row by row
        rewards = g2[0]["rewards"][step] + g2[1]["rewards"][step]
        adv = g2[0]["advantages"][step] + g2[1]["advantages"][step]
        assert rewards == pytest.approx(g1["rewards"][step], rel=1e-12, abs=1e-12)
        assert adv == pytest.approx(g1["advantages"][step], rel=1e-6, abs=1e-6)
        r, a = np.reshape(g1["rewards"][step], (4, 2)), np.reshape(g1["advantages"][step], (4, 2))
        assert (r[:3, 0] == 0).all() and (r[:3, 1] > 0).all() and (r[3] == 0).all()  # the fed answers score
        assert (a[:3, 1] > 0.7).all() and (a[:3, 0] < -0.7).all() and (a[3] == 0).all()  # +-1/sqrt(2); zero-std 0
    m1, m2 = g1["metrics"], g2[0]["metrics"]
    assert len(m1) == len(m2) == 2 and set(m1[0]) == set(m2[0])
    for a, b in zip(m1, m2):
        assert a["frac_reward_zero_std"] == 0.25 and a["parse_rate"] == pytest.approx(3 / 8)
        for k in ("reward", "reward_std", "frac_reward_zero_std", "parse_rate", "completion_length",
                  "truncated_rate", "completion_bucket") + tuple(k for k in a if k.startswith("rewards/")):
            # means / stds of the same per-row values; the pair's travel as float32 (one all-gather): ~1e-7 relative
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
        # float32 forward/backward of the same global batch on another layout: log-probs ~|logp| * 1e-6 apart.
        # entropy ~ log V ~ 7: relative; kl ~ d^2/2 with d = ref - logp (0 at step 1), moved by ~|d| * 1e-5;
        # loss = pg + beta kl where pg = -mean(advantages) cancels to ~1e-8 (ratio 1): absolute, at float32 rounding
        # of advantages ~1
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # the reference forward runs: the policy is the reference at the start (kl ~ 0, up to the rounding of two
    # compiled forwards), > 0 after one update
    assert m1[0]["kl"] < 1e-9 and m1[1]["kl"] > 1e-7
    # trained parameters: 2 AdamW updates with eps = 1 (update ~ lr * gradient): the movement from the common start
    # agrees to ~1e-4 of the largest movement (gradients agree to ~1e-5 relative); the movement itself is >> that
    p1, p2, s1, s2 = grpo["one"]["params_grpo"], grpo["two"]["params_grpo"], grpo["one"]["params_grpo_start"], \
        grpo["two"]["params_grpo_start"]
    assert set(p1) == set(p2) == set(s1) == set(s2)
    moved = 0.0
    for k in p1:
        assert np.array_equal(s1[k], s2[k]), k  # the same random start
        d1, d2 = p1[k].astype(np.float64) - s1[k], p2[k].astype(np.float64) - s2[k]
        scale = np.max(np.abs(d1))
        assert np.max(np.abs(d1 - d2)) <= 1e-3 * scale + 1e-7, (k, np.max(np.abs(d1 - d2)), scale)
        moved = max(moved, scale)
    assert moved > 1e-4  # the updates really move the weights


def test_grpo_on_several_processes_names_what_it_cannot_run(monkeypatch):
    """Several processes: a global batch that the data-parallel size does not divide, and the built-in reward
    evaluation, stop with one GRPOError line before the model is built; a dividing batch without it passes."""
    import types

    import jax

    from coordexp_jax.train import config as C, grpo_loop, sharding as shd

    cfg = C.base_config()
    cfg.train.kind = "grpo"
    cfg.data.batch_size, cfg.grpo.num_generations = 2, 3  # 1 prompt x 3 samples per process: 6 rows, 8 rolled out
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(shd, "make_mesh", lambda *a, **k: types.SimpleNamespace(shape={"data": 4, "fsdp": 1}))
    with pytest.raises(grpo_loop.GRPOError, match=r"global update batch of 6 rows .* data-parallel size 4"):
        grpo_loop._check_processes(cfg, builtin_eval=False)
    cfg.grpo.num_generations = 4
    grpo_loop._check_processes(cfg, builtin_eval=False)  # 8 rows over 4 devices
    with pytest.raises(grpo_loop.GRPOError, match="reward evaluation .* runs in one process only"):
        grpo_loop._check_processes(cfg, builtin_eval=True)  # eval.at_end is on by default
    cfg.eval.at_end = False
    grpo_loop._check_processes(cfg, builtin_eval=True)
