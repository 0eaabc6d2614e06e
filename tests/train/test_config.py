"""Config schema: unknown keys, wrong types and out-of-range values fail naming the key; the resolved config is
written to the workdir; every shipped config file validates."""

import glob
import json
import os

import ml_collections
import pytest

from coordexp_jax.train import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unknown_key_named_with_suggestion():
    cfg = C.base_config()
    with cfg.optim.unlocked():
        cfg.optim.lrr = 1e-3
    with pytest.raises(C.ConfigError, match=r"unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        C.validate(cfg)


def test_unknown_section_named():
    cfg = C.base_config()
    cfg.trian = ml_collections.ConfigDict({"steps": 3})
    with pytest.raises(C.ConfigError, match=r"unknown config key 'trian'"):
        C.validate(cfg)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("train.steps", "10", r"'train\.steps' must be int, got str"),
        ("lora.enabled", 1, r"'lora\.enabled' must be bool"),
        ("optim.lr", -1.0, r"'optim\.lr' = -1\.0 is out of range: must be >= 0"),
        ("train.nan_policy", "ignore", r"'train\.nan_policy' = 'ignore' is out of range"),
        ("data.seq_len", 100, r"'data\.seq_len' = 100 is out of range: must be a power of two"),
        ("mesh.fsdp", 0, r"'mesh\.fsdp' = 0 is out of range"),
        ("optim.vision.lr_mult", -0.5, r"'optim\.vision\.lr_mult' = -0\.5 is out of range"),
    ],
)
def test_type_and_range_errors_name_the_key(key, value, pattern):
    cfg = C.base_config().to_dict()
    d = cfg
    *head, leaf = key.split(".")
    for h in head:
        d = d[h]
    d[leaf] = value
    with pytest.raises(C.ConfigError, match=pattern):
        C.validate(ml_collections.ConfigDict(cfg))


def test_int_accepted_for_float_and_defaults_filled():
    cfg = ml_collections.ConfigDict({"optim": {"lr": 1}})
    full = C.validate(cfg)
    assert full.optim.lr == 1 and full.train.steps == C.base_config().train.steps


def test_bad_mesh_rule_axis_named():
    cfg = C.base_config()
    cfg.mesh.rules = (("embed", "model"),)
    with pytest.raises(C.ConfigError, match=r"mesh\.rules.*'embed'.*'model'"):
        C.validate(cfg)


@pytest.mark.parametrize("kind, path", [("synthetic", ""), ("hoi", "")])
def test_eval_path_with_a_synthetic_set_is_refused(kind, path):
    """A held-out file given for a generated set (which uses its own val split) would be ignored: refused, named."""
    cfg = C.base_config()
    cfg.data.kind, cfg.data.path, cfg.data.eval_path = kind, path, "my_val.jsonl"
    with pytest.raises(C.ConfigError, match=r"'data\.eval_path' = 'my_val\.jsonl'.*synthetic"):
        C.validate(cfg)
    cfg.data.eval_path = ""
    C.validate(cfg)  # without it the same config is fine
    if kind == "hoi":  # an HOI records file of one's own takes its eval file
        cfg.data.path, cfg.data.eval_path = "train.jsonl", "my_val.jsonl"
        C.validate(cfg)


def test_resolved_config_written(tmp_path):
    cfg = C.validate(C.base_config())
    path = C.write_resolved(cfg, str(tmp_path))
    back = json.load(open(path))
    assert back["optim"]["lr"] == cfg.optim.lr
    assert back["mesh"]["rules"][1] == list(cfg.mesh.rules[1])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_shipped_configs_validate(path):
    C.validate(C.load_config_file(path))
