"""`python -m coordexp_jax.evaluate` on what a training run leaves, and what the end of a run prints.

One tiny run (synthetic 64 px shapes, 2 steps, a checkpoint each step, EMA 0.5, an evaluation at the end) through
`python -m coordexp_jax.train` in process; then:
- the end of the run names the last evaluation's index.html and a predict command on a held-out image that runs;
  its 'done:' line carries the evaluation's headline rounded, once;
- evaluate takes a checkpoint step directory: the weights are the train state's EMA (eval.use_ema) or raw
  parameters, checked against orbax's own read of the step directory and against the exported final model;
- evaluate takes `--config.key=value` overrides (dashed spellings too) and prints a two-line summary, without a
  "PyTorch was not found" line in an environment without torch;
- a bad override is the same one line from evaluate as from train (one parser).
"""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from coordexp_jax import evaluate as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny_cli"
    c.model.preset = "tiny"
    c.data.kind = "synthetic"
    c.data.path = {syn!r}
    c.data.image_size = 64
    c.data.num_train = 8
    c.data.num_eval = 3
    c.data.max_objects = 2
    c.data.protocol = "tags"
    c.data.seq_len = 128
    c.data.batch_size = 2
    c.train.steps = 2
    c.train.log_every = 1
    c.train.ckpt_every = 1
    c.train.keep_n = 5
    c.train.ema_decay = 0.5
    c.train.progress = False
    c.train.tensorboard = False
    c.train.async_checkpoint = False
    c.eval.at_end = True
    c.eval.num_images = 3
    c.eval.batch_size = 3
    c.eval.max_new_tokens = 8
    c.eval.num_pictures = 1
    c.eval.use_ema = True
    return c
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(directory the run was started from, config file, workdir, the run's stdout lines)."""
    from coordexp_jax.train.__main__ import main

    d = tmp_path_factory.mktemp("evalcli")
    cfg = d / "tiny_cli.py"
    cfg.write_text(CONFIG.format(syn=str(d / "syn")))
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(d)  # the run prints paths relative to where it was started
    try:
        with contextlib.redirect_stdout(out):
            assert main(["train", "--config", str(cfg), "--workdir", "wd"]) == 0
    finally:
        os.chdir(cwd)
    return str(d), str(cfg), str(d / "wd"), out.getvalue().splitlines()


def test_end_of_training_names_the_report_and_a_predict_command_that_runs(run, monkeypatch):
    d, _, wd, lines = run
    report = [ln for ln in lines if ln.startswith("report: ")]
    assert len(report) == 1
    assert report[0].split()[1] == os.path.join("wd", "eval", "step_2", "index.html")
    assert os.path.isfile(os.path.join(d, report[0].split()[1]))
    cmd = [ln for ln in lines if "python -m coordexp_jax.predict" in ln]
    assert len(cmd) == 1 and cmd[0].startswith("predict on a held-out image: ")
    argv = shlex.split(cmd[0].split(": ", 1)[1])
    assert argv[:3] == ["python", "-m", "coordexp_jax.predict"]
    opts = dict(zip(argv[3::2], argv[4::2]))
    # the image: the first record of the validation file the run wrote (not a training image)
    with open(os.path.join(d, "syn", "val.jsonl")) as f:
        first = json.loads(f.readline())["images"][0]
    assert os.path.samefile(os.path.join(d, opts["--image"]), os.path.join(d, "syn", first))
    assert opts["--checkpoint"] == os.path.join("wd", "final_model")
    from coordexp_jax import predict

    monkeypatch.chdir(d)
    assert predict.main(argv[3:]) == 0  # ready to run as printed
    assert os.listdir(os.path.join(d, opts["--out"]))


def test_done_line_rounds_and_summarises_once(run):
    d, _, wd, lines = run
    assert sum(ln.startswith("done:") for ln in lines) == 1 and lines[-1].startswith("done:")
    ev = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl")) if '"eval"' in x]
    ev = [r for r in ev if r.get("kind") == "eval"][-1]
    # the figures are the evaluation's, rounded as the report shows them (logprob: the protocol has coordinate
    # tokens); no raw metrics dict and no figure with more than 4 decimals anywhere in the run's output
    want = (f"eval AP50 {ev['det/AP50_logprob']:.3f}, AP {ev['det/AP_logprob']:.3f}, F1@0.5 {ev['det/f1@0.5']:.3f}, "
            f"parse rate {100 * (1 - ev['det/parse_failure_rate']):.1f}%")
    assert lines[-1].endswith(want), (lines[-1], want)
    assert re.fullmatch(r"done: step 2 of 2 \(steps\), loss \d+\.\d{4}, skipped 0, compiles 1, eval .*", lines[-1])
    text = "\n".join(lines)
    assert "{" not in text and not re.search(r"\d\.\d{5,}", text), text


def _flat(tree) -> dict:
    """{'a/b/0/c': array} of a nested dict, nnx's trailing 'value' key dropped (orbax's raw read keeps it)."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out["/".join(keys[:-1] if keys[-1] == "value" else keys)] = np.asarray(leaf)
    return out


def _weights(checkpoint, cfg_path, use_ema=True):
    from flax import nnx

    from coordexp_jax.train.config import load_config_file, validate

    cfg = validate(load_config_file(cfg_path))
    cfg.eval.use_ema = use_ema
    _, model, info = E.load_model(checkpoint, cfg)
    return _flat(nnx.to_pure_dict(nnx.state(model))), info


def test_checkpoint_step_directory_loads_the_train_state_weights(run):
    import orbax.checkpoint as ocp

    _, cfg, wd, _ = run
    step1, info = _weights(os.path.join(wd, "checkpoints", "1"), cfg)
    assert info["step"] == 1 and info["weights"] == "EMA"
    assert info["checkpoint"] == os.path.join(wd, "checkpoints", "1")
    raw = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", "1", "state"))  # orbax, no target
    ema, params = _flat(raw["ema"]), _flat(raw["params"])
    assert set(ema) == set(step1) and len(step1) > 10
    for k, v in step1.items():  # the EMA tree cast to the parameter dtype: bit for bit
        np.testing.assert_array_equal(v, ema[k].astype(v.dtype), err_msg=k)
    assert any(not np.array_equal(ema[k], params[k]) for k in ema)  # so EMA vs raw is a real distinction
    # eval.use_ema=False: the raw parameters of the step
    raw1, info = _weights(os.path.join(wd, "checkpoints", "1"), cfg, use_ema=False)
    assert info["weights"] == "raw"
    for k, v in raw1.items():
        np.testing.assert_array_equal(v, params[k].astype(v.dtype), err_msg=k)
    # the last step's EMA weights are what the run exported to final_model/ (train.ema_decay > 0, eval.use_ema)
    step2, _ = _weights(os.path.join(wd, "checkpoints", "2"), cfg)
    final, info = _weights(wd, cfg)  # a workdir: its final_model/, the step it was exported at
    assert info["checkpoint"] == os.path.join(wd, "final_model") and info["step"] == 2
    assert set(step2) == set(final)
    for k in final:
        np.testing.assert_array_equal(step2[k], final[k], err_msg=k)


def test_evaluate_cli_overrides_summary_and_no_pytorch_line(run, tmp_path):
    """A real process in an environment without torch (hidden: transformers' availability check fails)."""
    _, cfg, wd, _ = run
    out = tmp_path / "ev"
    argv = ["evaluate", "--config", cfg, "--config.eval.num-images=2", "--config.eval.max_new_tokens", "6",
            "--checkpoint", os.path.join(wd, "checkpoints", "1"), "--out", str(out), "--batch-size", "2"]
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = " + repr(argv) + "; "
            "runpy.run_module('coordexp_jax.evaluate', run_name='__main__')")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PyTorch" not in r.stderr, r.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))  # every metric stays in metrics.json
    assert m["num_records"] == 2 and "det/exp_AP_logprob" in m
    lines = r.stdout.strip().splitlines()
    want = (f"tiny_cli step 1, 2 images: AP50 {m['det/AP50_logprob']:.3f}, AP {m['det/AP_logprob']:.3f}, "
            f"F1@0.5 {m['det/f1@0.5']:.3f}, parse rate {100 * (1 - m['det/parse_failure_rate']):.1f}%")
    assert lines == [want, f"report: {out / 'index.html'} (every metric: {out / 'metrics.json'})"], r.stdout
    page = open(out / "index.html").read()
    assert os.path.join(wd, "checkpoints", "1") in page and "EMA" in page and cfg in page
    assert len(open(out / "predictions.jsonl").readlines()) == 2


def test_bad_override_is_the_same_line_as_trains(run, capsys):
    from coordexp_jax.train.__main__ import main as train_main

    _, cfg, wd, _ = run
    ck = ["--checkpoint", wd, "--out", os.path.join(wd, "never")]
    for override, needle in (("--config.eval.num_imagez=2", "unknown config key 'eval.num_imagez'"),
                             ("--config.eval.num_images=two", "--config.eval.num_images=two")):
        assert train_main(["train", "--config", cfg, override, "--workdir", os.path.join(wd, "never")]) == 2
        train_err = capsys.readouterr().err.strip().splitlines()
        assert E.main(["--config", cfg, override, *ck]) == 2
        eval_err = capsys.readouterr().err.strip().splitlines()
        assert eval_err == train_err and len(eval_err) == 1 and needle in eval_err[0], (eval_err, train_err)
    assert E.main(ck) == 2
    assert capsys.readouterr().err.strip() == "error: the following arguments are required: --config"
    assert E.main(["--config", cfg, "--checkpoint", os.path.join(wd, "checkpoints", "9"), "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint ") and err.endswith("checkpoints/9: directory not found (the run's "
                                                                    "checkpoint steps: 1, 2)"), err
    assert not os.path.exists(os.path.join(wd, "never"))


def test_what_a_checkpoint_path_names(run, tmp_path):
    _, _, wd, _ = run
    ck = os.path.join(wd, "checkpoints")
    assert E.resolve_checkpoint(os.path.join(ck, "1")) == ("train_state", wd, 1)
    assert E.resolve_checkpoint(os.path.join(ck, "2") + "/") == ("train_state", wd, 2)
    assert E.resolve_checkpoint(ck) == ("train_state", wd, None)  # the latest
    assert E.resolve_checkpoint(wd) == ("model", os.path.join(wd, "final_model"), 2)
    assert E.resolve_checkpoint(os.path.join(wd, "final_model")) == ("model", os.path.join(wd, "final_model"), 2)
    bare = tmp_path / "no_final"  # a run without final_model/ (--noexport): its latest checkpoint
    bare.mkdir()
    (bare / "config.json").write_text(open(os.path.join(wd, "config.json")).read())
    os.symlink(ck, bare / "checkpoints")
    assert E.resolve_checkpoint(str(bare)) == ("train_state", str(bare), None)
    other = tmp_path / "some_model"  # anything else: load_checkpoint says what it is not
    other.mkdir()
    assert E.resolve_checkpoint(str(other)) == ("model", str(other), None)


def test_predict_takes_a_workdir_and_refuses_a_step_directory_in_one_line(run, tmp_path, capsys):
    """predict follows evaluate's rule for --checkpoint: a workdir stands for its final_model/; a training-state step
    directory is one `error:` line naming the export command (exit 2), never a traceback."""
    d, _, wd, _ = run
    from coordexp_jax import predict

    with open(os.path.join(d, "syn", "val.jsonl")) as f:
        image = os.path.join(d, "syn", json.loads(f.readline())["images"][0])
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", wd, "--image", image, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert os.path.samefile(summary["checkpoint"], os.path.join(wd, "final_model"))
    capsys.readouterr()
    step_dir = os.path.join(wd, "checkpoints", "2")
    assert predict.main(["--checkpoint", step_dir, "--image", image, "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "coordexp_jax.train.export" in err[0], err


def test_predict_hint_of_a_grounding_run_asks_the_records_phrase(run):
    """A grounding run's predict hint carries the held-out record's instruction (its referring phrase) as --prompt,
    so the printed command asks what the model was trained to answer, not the detection instruction."""
    d, cfg_path, wd, _ = run
    from coordexp_jax.train.__main__ import end_hints
    from coordexp_jax.train.config import load_config_file, validate

    cfg = load_config_file(cfg_path)
    cfg.data.synthetic_task = "grounding"
    cfg = validate(cfg)
    with open(os.path.join(d, "syn", "val_grounding.jsonl")) as f:
        phrase = json.loads(f.readline())["objects"][0]["desc"]
    hint = [ln for ln in end_hints(cfg, wd, os.path.join(wd, "final_model")) if "coordexp_jax.predict" in ln]
    argv = shlex.split(hint[0].split(": ", 1)[1])
    prompt = argv[argv.index("--prompt") + 1]
    assert prompt.endswith(": " + phrase), prompt


def test_hoi_run_gets_no_predict_hint(run, tmp_path):
    """An HOI run on a JSONL file: the end of training names the report but prints no predict command (predict does
    not build the boxes' links), and never reads the JSONL file as a fusion config (a traceback after training)."""
    d, cfg_path, wd, _ = run
    from coordexp_jax.train.__main__ import end_hints
    from coordexp_jax.train.config import load_config_file

    cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "hoi_demo.py"))
    recs = tmp_path / "hoi.jsonl"
    recs.write_text('{"a": 1}\n{"b": 2}\n')  # two JSON lines: json.load of the whole file fails
    cfg.data.path = str(recs)
    lines = end_hints(cfg, wd, os.path.join(wd, "final_model"))
    assert not [ln for ln in lines if "coordexp_jax.predict" in ln], lines
