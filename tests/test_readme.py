"""The README's "From Python" example runs as written, and the held-out image directory it names is the demo's.

Mechanism: every ```python block in README.md directly preceded by the line `<!-- readme-test -->` is extracted
and the blocks are run in order in one namespace, verbatim (no text substitution). They are written to run from
the repository root after the demo command, so the test builds that situation in a temporary directory:

- `runs/demo/final_model`: a stand-in for the demo's final model, the demo's architecture (`configs/demo.py`:
  tiny preset + its `model.overrides`, the project's small tokenizer) with random weights, saved the way training
  saves it (`save_checkpoint` + `preprocessing.json` from `train.__main__.write_preprocessing`);
- `configs/` -> the repository's configs;
- `COORDEXP_CACHE` -> a temporary cache holding one held-out image where `train.build.synthetic_dir` puts the
  demo's data set.

A renamed function, a changed signature or an undefined name in the README makes `test_readme_python_runs` fail.
"""

import io
import json
import os
import re
import contextlib

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from coordexp_jax.train import build
from coordexp_jax.train.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MARK = "<!-- readme-test -->"


def readme_blocks() -> list[str]:
    """The ```python blocks of README.md preceded by the MARK line, in order."""
    text = open(README, encoding="utf-8").read()
    return re.findall(r"^" + re.escape(MARK) + r"\n```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config_file(os.path.join(ROOT, "configs", "demo.py"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, demo_cfg):
    """A directory that looks like the repository root after the demo (see the module docstring)."""
    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.train.__main__ import write_preprocessing
    from coordexp_jax.weights import save_checkpoint

    root = tmp_path_factory.mktemp("readme")
    os.symlink(os.path.join(ROOT, "configs"), root / "configs")
    mc = build.model_config(demo_cfg, build.token_ids(demo_cfg))
    model = Qwen3VL(mc, rngs=nnx.Rngs(0))
    final = root / "runs" / "demo" / "final_model"
    os.makedirs(final.parent)
    save_checkpoint(str(final), model, mc)
    write_preprocessing(demo_cfg, mc, str(final))
    cache = root / "cache"
    return root, cache, mc


def _enter(sandbox, demo_cfg, monkeypatch):
    root, cache, _ = sandbox
    monkeypatch.chdir(root)
    monkeypatch.setenv("COORDEXP_CACHE", str(cache))
    val = os.path.join(build.synthetic_dir(demo_cfg), "images")
    assert val.startswith(str(cache))  # the env var is honoured, so the user's real cache is never touched
    os.makedirs(val, exist_ok=True)
    size = demo_cfg.data.image_size
    img = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(val, "val_000000.png"))


def _run(blocks) -> tuple[dict, str]:
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, src in enumerate(blocks):
            exec(compile(src, f"README.md python block {i}", "exec"), ns)
    return ns, out.getvalue()


def test_readme_has_marked_blocks():
    blocks = readme_blocks()
    assert len(blocks) >= 2, f"expected the marked From-Python blocks in README.md (marker {MARK!r})"


def test_readme_python_runs(sandbox, demo_cfg, monkeypatch):
    """The blocks run verbatim against the stand-in; what they compute agrees with the model itself."""
    _enter(sandbox, demo_cfg, monkeypatch)
    ns, _ = _run(readme_blocks())
    roll, logits, coord = ns["roll"], np.asarray(ns["logits"]), np.asarray(ns["coord"])
    cs = ns["encoder"].token_ids.coord_start
    # coord_logits is a slice of the same head: equal up to float32 rounding of two matmul paths; 1e-5 of the
    # largest logit holds on any x86 CPU (both are float32 dot products over 64 terms)
    scale = float(np.abs(logits[..., :sandbox[2].vocab_size]).max())
    np.testing.assert_allclose(coord, logits[..., cs:cs + 1000], rtol=0, atol=1e-5 * scale)
    # The sampler's first emitted token has the log-prob the forward pass gives at the prompt's last position
    # (the sampler pads the prompt to a bucket; masked padding changes float32 rounding only: 1e-4 of the largest
    # logit is ~100x that rounding on AVX2 and AVX-512 alike)
    last = logits[0, -1, :sandbox[2].vocab_size].astype(np.float64)
    ref = last - last.max() - np.log(np.exp(last - last.max()).sum())
    first = int(roll.tokens[0, 0])
    assert abs(float(roll.logprobs[0, 0]) - ref[first]) <= 1e-4 * scale


def test_readme_prints_boxes_in_pixels(sandbox, demo_cfg, monkeypatch):
    """With a scripted rollout (a known tags answer), the first block prints each object's desc and its box in
    pixels of the image: bins k / 999 times the image side (continuous pixel mode, the demo's)."""
    from coordexp_jax.coord import protocols
    from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer
    from coordexp_jax.rollout import sampler as sampler_lib

    _enter(sandbox, demo_cfg, monkeypatch)
    tok = small_tokenizer()
    tid = token_ids_from_tokenizer(tok)
    answer = [protocols.AnswerObject("red circle", bins=(0, 111, 999, 555)),
              protocols.AnswerObject("blue square", bins=(500, 500, 600, 700))]
    body = protocols.serialize(answer, tok, tid, "tags", order="given")
    ids = list(body.ids) + [tid.eos]

    def scripted(self, inputs, **kw):
        T = self.config.max_new_tokens
        tokens = np.full((1, T), tid.pad, np.int32)
        tokens[0, :len(ids)] = ids
        lp = np.full((1, T), -0.1, np.float32)
        chat = np.full((1, T), np.nan, np.float32)
        return sampler_lib.Rollout(tokens, lp, np.zeros_like(lp), chat, np.asarray([len(ids)], np.int32),
                                   np.asarray([True]))

    monkeypatch.setattr(sampler_lib.Sampler, "generate", scripted)
    _, printed = _run(readme_blocks()[:1])
    size = demo_cfg.data.image_size
    rows = [ln for ln in printed.splitlines() if ln.strip()]
    assert len(rows) == 2, printed
    for row, obj in zip(rows, answer):
        assert row.startswith(obj.desc), row
        nums = [float(x) for x in re.findall(r"-?\d+\.?\d*", row[len(obj.desc):])][:4]
        # the README prints boxes rounded to 2 decimals (objects_from_rollout): half a unit of the last place
        np.testing.assert_allclose(nums, np.asarray(obj.bins) / 999 * size, rtol=0, atol=0.005 + 1e-9)


def test_readme_names_the_demo_heldout_dir(demo_cfg, monkeypatch):
    """The held-out image directory the README names is where the demo's data set is generated."""
    monkeypatch.delenv("COORDEXP_CACHE", raising=False)
    want = os.path.basename(build.synthetic_dir(demo_cfg))
    text = open(README, encoding="utf-8").read()
    named = set(re.findall(r"synthetic_[0-9a-f]{10}", text))
    assert named == {want}, f"README names {sorted(named)}, configs/demo.py generates {want}"
