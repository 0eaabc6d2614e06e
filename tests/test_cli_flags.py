"""One flag spelling across every CLI: `--snake_case` is the spelling help shows, `--snake-case` a hidden alias.

The CLIs are found, not listed: every module under coordexp_jax/ and tools/ whose source builds an
`ArgumentParser(` and defines `main(argv)`; `main([])` runs until its first `parse_known_args`, where the parser is
captured (nothing after that runs). The reference for "both spellings work" is argparse itself: the namespace a
flag's canonical spelling gives must equal the alias's and differ from the one without the flag.
Also: the shared `--config FILE --config.key=value` parser (train and evaluate), and no "PyTorch was not found"
line from a command run without torch.
"""

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

from coordexp_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CLIs that must be found (the discovery itself is under test: finding none would pass every check vacuously)
KNOWN = {"coordexp_jax.evaluate", "coordexp_jax.predict", "coordexp_jax.train.export", "tools/convert_dataset.py",
         "tools/convert_hf.py", "tools/expand_coord_vocab.py", "tools/export_hf.py", "tools/make_synthetic.py"}


class _Captured(BaseException):  # not an Exception: passes through `cli.guard` and any `except Exception`
    def __init__(self, parser):
        self.parser = parser


def _cli_sources() -> dict[str, str]:
    """{name: file} of every module with a parser and a main(): 'coordexp_jax.x.y' or 'tools/name.py'."""
    out = {}
    for base in ("coordexp_jax", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                src = open(path, encoding="utf-8").read()
                if "ArgumentParser(" not in src or "def main(" not in src:
                    continue
                rel = os.path.relpath(path, ROOT)
                name = rel if base == "tools" else rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[name] = path
    return out


def _import(name: str, path: str):
    if name.startswith("tools/"):
        spec = importlib.util.spec_from_file_location(f"_cli_{os.path.basename(path)[:-3]}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def parsers():
    """{name: the parser its main() builds}."""
    found = {}
    orig = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        for name, path in sorted(_cli_sources().items()):
            try:
                _import(name, path).main([])
            except _Captured as c:
                found[name] = c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = orig
    return found


def test_every_cli_is_found_and_uses_the_project_parser(parsers):
    assert KNOWN <= set(parsers), sorted(KNOWN - set(parsers))
    plain = [n for n, p in parsers.items() if not isinstance(p, cli.ArgumentParser)]
    assert not plain, f"CLIs on plain argparse (no alias, no one-line errors): {plain}"


def _value(action):
    """A command-line value for `action` that differs from its default (strings)."""
    if action.choices:
        return str(next(c for c in action.choices if c != action.default))
    if action.type is int:
        return str((action.default if isinstance(action.default, int) else 0) + 3)
    if action.type is float:
        return str((action.default if isinstance(action.default, float) else 0.0) + 0.25)
    return "some_value"


def _args(action, option: str) -> list[str]:
    if action.nargs == 0:  # store_true / store_false / count
        return [option]
    n = action.nargs if isinstance(action.nargs, int) else 1
    return [option, *[_value(action)] * n]


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _required_argv(parser, skip=None) -> list[str]:
    argv = []
    for a in parser._actions:
        if a is skip or isinstance(a, argparse._HelpAction):
            continue
        if not a.option_strings:
            argv += [_value(a)] * (a.nargs if isinstance(a.nargs, int) else 1)
        elif a.required:
            argv += _args(a, a.option_strings[0])
    return argv


def test_both_spellings_of_every_multi_word_flag(parsers):
    checked = 0
    for name, p in sorted(parsers.items()):
        help_text = p.format_help()
        for a in _flags(p):
            long = [s for s in a.option_strings if s.startswith("--")]
            for s in long:  # the spelling help and errors show: --snake_case
                assert "-" not in s[2:], f"{name}: {s} is not --snake_case"
            words = [s for s in long if "_" in s]
            if not words:
                continue
            canon = words[0]
            alias = "--" + canon[2:].replace("_", "-")
            assert alias not in help_text.split(), f"{name}: help shows the alias {alias}"
            base = _required_argv(p, skip=a)
            without = a.default if a.required else vars(p.parse_args(base))[a.dest]
            by_canon = vars(p.parse_args(base + _args(a, canon)))
            by_alias = vars(p.parse_args(base + _args(a, alias)))
            assert by_alias == by_canon, (name, canon)
            assert by_canon[a.dest] != without, (name, canon)  # the flag took effect
            if a.nargs != 0:  # --flag=value too
                assert vars(p.parse_args(base + [f"{alias}={_value(a)}"])) == by_canon, (name, alias)
            checked += 1
    assert checked >= 10, checked  # e.g. evaluate --max_records, export_hf --tokenizer_dir, make_synthetic ...


def test_alias_is_hidden_from_errors_and_abbreviations_stay_unambiguous():
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--max_records", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("--max-new-tokens", type=int, default=1)  # a dashed registration gets the snake alias
    with pytest.raises(cli.UsageError) as e:
        p.parse_args(["--max-records", "abc"])
    assert str(e.value) == "argument --max_records: invalid int value: 'abc'"
    assert p.parse_args(["--max_r", "4"]).max_records == 4  # an abbreviation matching both spellings of one flag
    assert p.parse_args(["--max_new_tokens", "9"]).max_new_tokens == 9
    with pytest.raises(cli.UsageError, match="ambiguous option: --max could match --max_records, --max-new-tokens$"):
        p.parse_args(["--max", "5"])
    with pytest.raises(cli.UsageError, match="unrecognized arguments: --max--records"):
        p.parse_args(["--max--records", "5"])


def test_train_help_names_the_spelling(capsys):
    from coordexp_jax.train.__main__ import main

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config.optim.lr=3e-4" in out and "snake_case" in out
    assert "--config.train.max-minutes" in out  # the dashed key alias is documented


def test_config_overrides_one_parser_dashed_keys(tmp_path):
    """train and evaluate read --config and its overrides with the same code; a dashed key is the same key."""
    cfg = tmp_path / "c.py"
    cfg.write_text("from coordexp_jax.train.config import base_config\n\n\ndef get_config():\n"
                   "    return base_config()\n")
    argv = cli.normalize_config_args(["prog", "--out", "o", "--config", str(cfg), "--config.train.max-minutes=2.5",
                                      "--config.eval.num_images", "3", "--batch-size", "4"])
    flags = cli.config_flag_values(argv)
    rest = cli.parse_config_flags(flags, argv, known_only=True)
    assert rest == ["prog", "--out", "o", "--batch-size", "4"]  # what the config parser does not know, in order
    assert flags.config.train.max_minutes == 2.5 and flags.config.eval.num_images == 3
    for bad, needle in ((["--config.train.max_minutez=1"], "unknown config key 'train.max_minutez'"),
                        (["--config.eval.num_images=x"], "--config.eval.num_images=x")):
        argv = ["prog", "--config", str(cfg), *bad]
        with pytest.raises(cli.UsageError, match=needle):
            cli.parse_config_flags(cli.config_flag_values(argv), argv)


def test_no_pytorch_line_without_torch(tmp_path):
    """transformers logs 'PyTorch was not found' when imported without torch; the project uses it for tokenizers
    only, so a command without torch prints nothing of it (torch hidden: `sys.modules['torch'] = None` makes
    transformers' find_spec check fail as in an environment without torch)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from coordexp_jax.data.tokenizer import small_tokenizer\n"
            "assert len(small_tokenizer()) > 1000\n"
            "import transformers\n"
            "assert not transformers.is_torch_available()\n"
            "transformers.logging.get_logger('transformers').warning('another transformers warning')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PyTorch" not in r.stderr, r.stderr
    assert "another transformers warning" in r.stderr  # every other transformers message still passes


def test_a_data_source_logs_its_record_summary_once(tmp_path, caplog):
    """Reading a training/evaluation source logs one summary ('records: N read, N kept' and the skips), naming
    the file, not one from the JSONL reader and another from the pipeline."""
    import json
    import logging

    from PIL import Image

    from coordexp_jax.data.pipeline import SourceSpec, load_source

    Image.new("RGB", (32, 24)).save(tmp_path / "a.png")
    rec = {"images": ["a.png"], "width": 32, "height": 24, "objects": [{"desc": "cat", "bbox_2d": [1, 2, 20, 20]}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(dict(rec, images=["gone.png"])) + "\n")  # 2nd: skipped
    with caplog.at_level(logging.INFO):
        recs, rep = load_source(SourceSpec("d", str(path)))
    assert len(recs) == 1 and rep.records_read == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("records: 2 read, 1 kept") == 1, text
    assert str(path) in text
