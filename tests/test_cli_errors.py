"""Every CLI over a corpus of bad inputs: exit code 2, exactly one `error: ...` line on stderr naming the file,
record, key or tensor, and no traceback. The CLIs run in-process (`main(argv)`), plus three real subprocesses
that show what reaches a terminal."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from coordexp_jax import evaluate, predict
from coordexp_jax.train import __main__ as train_cli, export as export_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "data", "bad_inputs")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one_error_line(err: str) -> str:
    """The single `error:` line of `err`; it must be the last line and no traceback may precede it (log lines of a
    run that started, e.g. 'mesh ... over 1 devices', may)."""
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == errors[0], err[-3000:]
    return errors[0]


def _expect(capsys, main, argv, *needles):
    rc = main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    for n in needles:
        assert n in line, (n, line)
    return line


def _record(box, **kw):
    return dict({"images": ["good.png"], "width": 64, "height": 48, "objects": [{"desc": "cat", "bbox_2d": box}]},
                **kw)


def _write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _fusion(path, sources):
    with open(path, "w") as f:
        f.write("from coordexp_jax.data.pipeline import fusion_config\n\n\ndef get_config():\n"
                f"    return fusion_config({sources!r})\n")
    return str(path)


TINY_CONFIG = '''
from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.preset = "tiny"
    c.data.kind = "jsonl"
    c.data.path = {good!r}
    c.data.image_size = 64
    c.data.seq_len = 128
    c.data.batch_size = 2
    c.data.num_eval = 0
    c.train.steps = 1
    c.train.progress = False
    c.train.tensorboard = False
    c.train.async_checkpoint = False
    c.eval.at_end = False
    c.eval.kind = "loss"
    return c
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good and bad data files, fusion presets, configs and a tiny untied HF checkpoint without its lm_head."""
    d = tmp_path_factory.mktemp("corpus")
    shutil.copy(os.path.join(FIXTURES, "good.png"), d / "good.png")  # 64 x 48
    shutil.copy(os.path.join(FIXTURES, "truncated.jpg"), d / "truncated.jpg")
    c = {"dir": d, "good": _write_jsonl(d / "good.jsonl", [_record([4, 5, 30, 40])] * 4)}
    c["three_numbers"] = _write_jsonl(d / "three.jsonl", [_record([4, 5, 30, 40]), _record([4, 5, 30])])
    c["bin1000"] = _write_jsonl(d / "bin1000.jsonl", [_record([0, 0, 500, 500]), _record([0, 0, 1000, 500])])
    c["empty"] = _write_jsonl(d / "empty.jsonl", [])
    c["all_skipped"] = _write_jsonl(d / "skipped.jsonl", [dict(_record([4, 5, 30, 40]), images=["gone.png"])] * 3)
    good = c["good"]
    c["fusion"] = {
        "norm1000_bin": _fusion(d / "f_bin.py", [dict(name="n", path=c["bin1000"], box_format="norm1000")]),
        "box_format": _fusion(d / "f_fmt.py", [dict(name="coco", path=good, box_format="norm100")]),
        "unknown_key": _fusion(d / "f_key.py", [dict(name="coco", path=good, wieght=2.0)]),
        "zero_weights": _fusion(d / "f_zero.py", [dict(name="a", path=good, weight=0.0),
                                                  dict(name="b", path=good, weight=0.0)]),
        "negative_weight": _fusion(d / "f_neg.py", [dict(name="a", path=good, weight=2.0),
                                                    dict(name="b", path=good, weight=-1.0)]),
        "empty_source": _fusion(d / "f_empty.py", [dict(name="a", path=good), dict(name="e", path=c["empty"])]),
        "all_skipped": _fusion(d / "f_skip.py", [dict(name="a", path=good), dict(name="s", path=c["all_skipped"])]),
    }
    c["config"] = str(d / "tiny.py")
    (d / "tiny.py").write_text(TINY_CONFIG.format(good=good))
    (d / "syntax.py").write_text("def get_config(:\n    pass\n")
    (d / "bad_override.py").write_text(TINY_CONFIG.format(good=good).replace(
        "    return c", "    c.model.overrides = {'text': {'hiden_size': 96}}\n    return c"))
    (d / "unknown_key.py").write_text(TINY_CONFIG.format(good=good).replace("    return c", "    c.optim.lrr = 1.0\n"
                                                                          "    return c"))
    c["no_lm_head"], c["checkpoint"] = _checkpoints(c["config"], str(d / "hf_no_lm_head"), str(d / "ours"))
    return c


def _checkpoints(config_path, hf_out, ours_out):
    """The tiny untied model of the config (the project tokenizer's vocabulary): an HF directory with lm_head.weight
    deleted, and the model in our checkpoint format."""
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.train import build, config as C
    from coordexp_jax.weights.checkpoint import save_checkpoint
    from coordexp_jax.weights.hf import save_hf_checkpoint

    cfg = C.validate(C.load_config_file(config_path))
    ids = build.token_ids(cfg)
    mc = build.model_config(cfg, ids)
    assert not mc.tie_word_embeddings
    model = Qwen3VL(mc, rngs=nnx.Rngs(0))
    save_checkpoint(ours_out, model, mc)
    save_hf_checkpoint(model, mc, hf_out)
    f = os.path.join(hf_out, "model.safetensors")
    t = load_file(f)
    del t["lm_head.weight"]
    save_file(t, f, metadata={"format": "pt"})
    return hf_out, ours_out


# ---------------------------------------------------------------------------------------------- python -m ...train

def _train(c, tmp_path, *args, config=None):
    return ["train", "--config", config or c["config"], "--workdir", str(tmp_path / "run"), *args]


@pytest.mark.parametrize("case", ["missing_config", "config_syntax", "config_unknown_key", "override_unknown_key",
                                  "override_bad_type", "override_out_of_range", "unknown_flag", "no_config",
                                  "model_override_field"])
def test_train_config_errors(case, corpus, tmp_path, capsys):
    d = corpus["dir"]
    argv, needles = {
        "missing_config": (_train(corpus, tmp_path, config=str(d / "nope.py")), ["nope.py", "not found"]),
        "config_syntax": (_train(corpus, tmp_path, config=str(d / "syntax.py")), ["syntax.py", "line 1"]),
        "config_unknown_key": (_train(corpus, tmp_path, config=str(d / "unknown_key.py")), ["optim.lrr"]),
        "override_unknown_key": (_train(corpus, tmp_path, "--config.optim.lrr=1"), ["optim.lrr"]),
        "override_bad_type": (_train(corpus, tmp_path, "--config.train.steps=abc"), ["train.steps", "abc"]),
        "override_out_of_range": (_train(corpus, tmp_path, "--config.train.steps=-1"), ["train.steps", "-1"]),
        "unknown_flag": (_train(corpus, tmp_path, "--wrokdir=x"), ["wrokdir"]),
        "no_config": (["train"], ["--config is required"]),
        "model_override_field": (_train(corpus, tmp_path, config=str(d / "bad_override.py")),
                                 ["model.overrides.text.hiden_size"]),
    }[case]
    _expect(capsys, train_cli.main, argv, *needles)


@pytest.mark.parametrize("case", ["missing_data_path", "three_numbers", "empty_source_jsonl", "all_skipped_jsonl"])
def test_train_data_errors(case, corpus, tmp_path, capsys):
    path, needles = {
        "missing_data_path": (str(corpus["dir"] / "gone.jsonl"), ["data.path", "gone.jsonl"]),
        "three_numbers": (corpus["three_numbers"], ["three.jsonl:2"]),
        "empty_source_jsonl": (corpus["empty"], ["empty.jsonl"]),
        "all_skipped_jsonl": (corpus["all_skipped"], ["skipped.jsonl"]),
    }[case]
    _expect(capsys, train_cli.main, _train(corpus, tmp_path, f"--config.data.path={path}"), *needles)


@pytest.mark.parametrize("case, needles", [
    ("norm1000_bin", ["bin1000.jsonl:2"]),
    ("box_format", ["box_format", "norm100"]),
    ("unknown_key", ["wieght"]),
    ("zero_weights", ["weight"]),
    ("negative_weight", ["weight", "-1"]),
    ("empty_source", ["'e'", "empty.jsonl"]),
    ("all_skipped", ["'s'", "skipped.jsonl"]),
])
def test_train_fusion_errors(case, needles, corpus, tmp_path, capsys):
    argv = _train(corpus, tmp_path, "--config.data.kind=fusion", f"--config.data.path={corpus['fusion'][case]}")
    _expect(capsys, train_cli.main, argv, *needles)


def test_train_missing_lm_head(corpus, tmp_path, capsys):
    _expect(capsys, train_cli.main, _train(corpus, tmp_path, f"--config.model.checkpoint={corpus['no_lm_head']}"),
            "lm_head")


# ------------------------------------------------------------------------------------------- evaluate, predict

def test_evaluate_errors(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    cfg = corpus["config"]
    _expect(capsys, evaluate.main, ["--config", str(tmp_path / "nope.py"), "--checkpoint", str(tmp_path), "--out",
                                    out], "nope.py")
    _expect(capsys, evaluate.main, ["--config", str(corpus["dir"] / "unknown_key.py"), "--checkpoint",
                                    corpus["no_lm_head"], "--out", out], "optim.lrr")
    _expect(capsys, evaluate.main, ["--config", cfg, "--checkpoint", str(tmp_path / "gone"), "--out", out], "gone")
    _expect(capsys, evaluate.main, ["--config", cfg, "--checkpoint", corpus["no_lm_head"], "--out", out], "lm_head")
    _expect(capsys, evaluate.main, ["--config", cfg, "--out", out], "--checkpoint")  # argparse: a missing argument
    _expect(capsys, evaluate.main, ["--config", cfg, "--checkpoint", corpus["checkpoint"], "--out", out],
            "no evaluation data")


def test_predict_errors(corpus, tmp_path, capsys):
    d, out = corpus["dir"], str(tmp_path / "o")
    ck = ["--checkpoint", corpus["no_lm_head"]]
    _expect(capsys, predict.main, [*ck, "--image", str(d / "gone.png"), "--out", out], "gone.png")
    good_ck = ["--checkpoint", corpus["checkpoint"]]  # the image is the one mistake (whatever is read first)
    _expect(capsys, predict.main, [*good_ck, "--image", str(d / "truncated.jpg"), "--out", out], "truncated.jpg")
    _expect(capsys, predict.main, ["--checkpoint", str(d / "gone_ck"), "--image", str(d / "good.png"), "--out", out],
            "gone_ck")
    _expect(capsys, predict.main, [*ck, "--image", str(d / "good.png"), "--out", out], "lm_head")
    # the dashed spelling is an alias; the message names the flag as help spells it
    _expect(capsys, predict.main, [*ck, "--image", str(d / "good.png"), "--out", out, "--max-new-tokens", "0"],
            "--max_new_tokens")
    _expect(capsys, predict.main, [*ck, "--image", str(d / "good.png"), "--out", out, "--top-q", "1"], "--top-q")


# ------------------------------------------------------------------------------------- train.export and tools/*

def test_export_errors(corpus, tmp_path, capsys):
    from coordexp_jax.train import config as C

    out = str(tmp_path / "o")
    _expect(capsys, export_cli.main, ["--workdir", str(tmp_path / "gone"), "--out", out], "gone")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(capsys, export_cli.main, ["--workdir", str(empty), "--out", out], "config.json")
    run = tmp_path / "run"
    run.mkdir()
    C.write_resolved(C.validate(C.load_config_file(corpus["config"])), str(run))
    _expect(capsys, export_cli.main, ["--workdir", str(run), "--out", out], "no checkpoint", str(run))
    _expect(capsys, export_cli.main, ["--workdir", str(run), "--step", "7", "--out", out], "step 7")
    (run / "config.json").write_text("{not json")
    _expect(capsys, export_cli.main, ["--workdir", str(run), "--out", out], "config.json:1")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    _expect(capsys, export_cli.main, ["--workdir", str(run), "--out", str(tmp_path / "full")], "full",
            "not empty")
    assert not os.path.exists(out)


def test_weight_tools_errors(corpus, tmp_path, capsys):
    convert_hf, export_hf, expand = _tool("convert_hf").main, _tool("export_hf").main, _tool("expand_coord_vocab").main
    out = str(tmp_path / "o")
    _expect(capsys, convert_hf, ["--hf_dir", str(tmp_path / "gone"), "--out", out], "gone")
    _expect(capsys, convert_hf, ["--hf_dir", corpus["no_lm_head"], "--out", out], "lm_head")
    _expect(capsys, convert_hf, ["--hf_dir", corpus["no_lm_head"], "--out", out, "--dtype", "float8"], "float8")
    _expect(capsys, export_hf, ["--checkpoint", str(tmp_path / "gone"), "--out", out], "gone")
    _expect(capsys, expand, ["--src", str(tmp_path / "gone"), "--dst", out], "gone")
    assert not os.path.exists(out)


def test_data_tools_errors(corpus, tmp_path, capsys):
    make_synthetic, convert_dataset = _tool("make_synthetic").main, _tool("convert_dataset").main
    out = str(tmp_path / "o")
    _expect(capsys, make_synthetic, ["--out", out, "--num", "1", "--classes", "blob"], "blob")
    _expect(capsys, make_synthetic, ["--out", out, "--num", "-1"], "--num")
    _expect(capsys, make_synthetic, ["--out", out], "--num")
    _expect(capsys, convert_dataset, ["--format", "coco", "--input", str(tmp_path / "gone.json"), "--images",
                                      str(tmp_path), "--out", out + ".jsonl"], "gone.json")
    _expect(capsys, convert_dataset, ["--format", "jsonl2coco", "--input", corpus["three_numbers"], "--out",
                                      out + ".json"], "three.jsonl:2")
    _expect(capsys, convert_dataset, ["--format", "cocoo", "--input", corpus["good"], "--out", out], "cocoo")


# --------------------------------------------------------------------------------------- the guard by itself

def test_guard_collapses_lines_and_keeps_bug_tracebacks(capsys):
    from coordexp_jax import cli
    from coordexp_jax.errors import CoordExpError

    def bad_record(argv):
        raise CoordExpError("the checkpoint does not match this run:\n  lora.enabled: checkpoint False, this run "
                            "True\n\n  model.text.hidden_size: checkpoint 64, this run 96\nUse a fresh --workdir.")

    line = _expect(capsys, cli.guard(bad_record), None)
    assert line == ("error: the checkpoint does not match this run: lora.enabled: checkpoint False, this run True; "
                    "model.text.hidden_size: checkpoint 64, this run 96; Use a fresh --workdir.")

    def missing(argv):
        open(os.path.join("/nonexistent-dir", "x.json"))

    _expect(capsys, cli.guard(missing), None, "/nonexistent-dir/x.json")

    def bug(argv):
        return np.zeros(3)[5]

    with pytest.raises(IndexError):  # a bug is not a user's error: it keeps its traceback
        cli.guard(bug)(None)
    assert cli.guard(lambda argv: None)(None) == 0


# -------------------------------------------------------------------------------------------- real processes

@pytest.mark.parametrize("cmd, needle", [
    (["-m", "coordexp_jax.train", "--config", "/no/such/config.py"], "/no/such/config.py"),
    (["tools/convert_hf.py", "--hf_dir", "/no/such/hf", "--out", "{tmp}/o"], "/no/such/hf"),
    (["-m", "coordexp_jax.predict", "--checkpoint", "/no/such/ck", "--image", "{fixtures}/good.png", "--out",
      "{tmp}/o"], "/no/such/ck"),
])
def test_subprocess_prints_one_line(cmd, needle, tmp_path):
    cmd = [a.format(tmp=tmp_path, fixtures=FIXTURES) for a in cmd]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr[-3000:]
