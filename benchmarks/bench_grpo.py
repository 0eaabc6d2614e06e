"""One GRPO step, ours (train/grpo_loop.py) vs TRL's `GRPOTrainer`, on the same tiny Qwen3-VL weights, side by side.

    pip install trl==1.16.0        # only this benchmark needs TRL (not in requirements*.txt)
    python benchmarks/bench_grpo.py [--checkpoint DIR] [--G 8] [--B 8] [--new_tokens 64] [--steps 3]

The weights: `--checkpoint` (ours, e.g. a demo run's final_model; default: the demo config's tiny model from random
init, saved once), exported for transformers with `tools/export_hf.py`; TRL loads the export (and a second copy as
its reference model), we load ours. The prompts: B synthetic grounding records (one 128 px image + "Find the object
described by the phrase ...: <phrase>"), the same records in the same order on both sides, the demo's prompt
format (TRL gets it through a chat template and a Qwen3-VL processor with our image settings: the same number of
image tokens per prompt).

One step on each side: B prompts x G samples at temperature 1 (no top-k/top-p) of at most --new_tokens tokens
(rollout); the same reward function (our parser + the Gaussian point and Gaussian plane rewards); group
advantages (TRL scale_rewards='group'); the reference log-probs (beta 0.04); one AdamW update (lr 1e-5, clip 1.0)
of the GRPO loss (ours 'seq_mean_token_mean' = TRL loss_type 'grpo', epsilon 0.2, one iteration per batch).
'prep' is prompt preprocessing, timed apart: TRL's processor calls (tokenising the chat template, the image
processor; it runs them for the rollout and again for the log-prob forward), ours the data pipeline's encoder +
collator on the same records (in training it runs in the pipeline's worker processes). Medians of --steps steps after one warm-up step (compiles, caches).
float32 on both sides; torch gets as many threads as JAX uses cores (--threads).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from coordexp_jax.cli import ArgumentParser  # noqa: E402

REWARDS = {"gaussian_point": 1.0, "gaussian_plane": 1.0}  # configs/grpo_demo.py's

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def parse(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="our checkpoint dir (default: demo tiny model, random init)")
    ap.add_argument("--G", type=int, default=8, help="samples per prompt")
    ap.add_argument("--B", type=int, default=8, help="prompts per step")
    ap.add_argument("--new_tokens", type=int, default=64, help="max completion length")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip_trl", action="store_true")
    ap.add_argument("--workdir", default="", help="where the checkpoint and export go (default: a temp dir)")
    return ap.parse_args(argv)


def demo_config(a, checkpoint: str):
    from configs import grpo_demo
    from coordexp_jax.train import config as C

    c = grpo_demo.get_config()
    c.model.checkpoint = checkpoint
    c.data.batch_size = a.B
    c.grpo.num_generations = a.G
    c.grpo.max_new_tokens = a.new_tokens
    for k in list(c.grpo.rewards):
        c.grpo.rewards[k] = REWARDS.get(k, 0.0)
    c.grpo.aggregation = "seq_mean_token_mean"
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.clip_norm = 1e-5, 0, 0.0, 1.0
    c.train.steps = a.steps + 1
    return C.validate(c)


def prepare_weights(a, work: str) -> tuple[str, str]:
    """(our checkpoint dir, its HF export via tools/export_hf.py)."""
    from coordexp_jax.data.tokenizer import SMALL_TOKENIZER_DIR

    ours = a.checkpoint
    if not ours:
        ours = os.path.join(work, "ours")
        if not os.path.isdir(ours):
            from coordexp_jax.train import build
            from coordexp_jax.weights.checkpoint import save_checkpoint

            cfg = demo_config(a, "")
            ids = build.token_ids(cfg)
            mc = build.model_config(cfg, ids)
            model = build.make_model_fn(cfg, mc, ids)[0]()
            save_checkpoint(ours, model, mc)
    hf = os.path.join(work, "hf")
    if not os.path.isdir(hf):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), "--checkpoint", ours,
                        "--out", hf, "--tokenizer_dir", SMALL_TOKENIZER_DIR], check=True)
    return ours, hf


def records(cfg, n: int):
    """The first n synthetic grounding training records (the demo's set, generated on first use)."""
    from coordexp_jax.data.pipeline import load_source
    from coordexp_jax.train import build

    specs, _ = build.data_specs(cfg)
    recs = load_source(specs[0])[0]
    return recs[:n]


class Timer:
    def __init__(self):
        self.t: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        yield
        self.t.setdefault(name, []).append(time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------------ ours
def bench_ours(a, cfg, recs_per_step):
    from coordexp_jax.data.prompts import Collator, SampleEncoder
    from coordexp_jax.train import build, grpo_loop as GL

    comps = build.build_components(cfg)
    parts = GL.build_parts(cfg, comps)
    enc = SampleEncoder(comps.extra["prompt_config"], tokenizer_dir=comps.tokenizer_dir)
    coll = Collator(comps.extra["prompt_config"], comps.token_ids, comps.model_config)
    state = parts.state
    per_step, lengths = [], []
    for s, recs in enumerate(recs_per_step):
        tm = Timer()
        t0 = time.perf_counter()
        with tm("prep"):
            batch = coll([enc(r) for r in recs])
        micro, host = parts.runner.rollout([batch], state.params, state.frozen, s)
        tm.t["rollout"], tm.t["reward"] = [host["rollout_s"]], [host["reward_s"]]
        with tm("ref_logp"):
            dev = parts.to_device(micro)
            ref = jax.block_until_ready(parts.ref_fn(state.params, state.frozen, dev, parts.reference.store))
        with tm("update"):
            state, m = parts.step_fn(state, dict(dev, ref_logp=ref))
            m = jax.device_get(m)
        tm.t["total"] = [time.perf_counter() - t0]
        per_step.append({k: sum(v) for k, v in tm.t.items()})
        lengths.append(host["completion_length"])
    return per_step, lengths


# ------------------------------------------------------------------------------------------------------------- TRL
def bench_trl(a, cfg, hf_dir, recs_per_step):
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from coordexp_jax.coord import protocols
    from coordexp_jax.data.prompts import SampleEncoder
    from coordexp_jax.data.tokenizer import load_tokenizer, token_ids_from_tokenizer
    from coordexp_jax.rl.rewards import compute_rewards
    from coordexp_jax.train import build

    torch.set_num_threads(a.threads)
    ids_cfg = build.token_ids(cfg)
    mc = build.model_config(cfg, ids_cfg)
    pcfg = build.prompt_config(cfg, mc)
    enc = SampleEncoder(pcfg, tokenizer_dir=build.tokenizer_dir(cfg))
    tok = load_tokenizer(build.tokenizer_dir(cfg))
    ids = token_ids_from_tokenizer(tok)
    tok.chat_template = CHAT_TEMPLATE
    img = pcfg.image
    improc = Qwen2VLImageProcessorPil(patch_size=img.patch_size, merge_size=img.merge_size,
                                   temporal_patch_size=img.temporal_patch_size,
                                   min_pixels=img.min_pixels, max_pixels=img.max_pixels,
                                   size={"shortest_edge": img.min_pixels, "longest_edge": img.max_pixels})

    tm = Timer()
    in_generate = [False]

    class Processor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # no video processor (it needs torchvision)
            return None

        def __call__(self, *x, **k):  # every tokenisation + image processing, for the 'prep' column
            with tm("prep_in_generate" if in_generate[0] else "prep_other"):
                return super().__call__(*x, **k)

    proc = Processor(image_processor=improc, tokenizer=tok, video_processor=None, chat_template=CHAT_TEMPLATE)
    flat = [r for recs in recs_per_step for r in recs]
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": enc.instruction_text(r)}]}],
             "image": Image.open(r.image).convert("RGB"),
             "gt_desc": [o.desc for o in r.objects], "gt_box": [list(o.box) for o in r.objects]} for r in flat]
    ds = Dataset.from_list(rows)

    def reward(prompts, completions, completion_ids, gt_desc, gt_box, **kw):
        parsed = [protocols.parse(list(c), tok, ids, pcfg.protocol) for c in completion_ids]
        total, _ = compute_rewards(parsed, [list(zip(d, b)) for d, b in zip(gt_desc, gt_box)], REWARDS)
        return [float(x) for x in total]

    model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    out = tempfile.mkdtemp(prefix="bench_grpo_trl_")
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=a.B * a.G, gradient_accumulation_steps=1,
                      num_generations=a.G, max_completion_length=a.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                      beta=0.04, epsilon=0.2, num_iterations=1, loss_type="grpo", scale_rewards="group",
                      learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, max_steps=len(recs_per_step), logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, fp16=False, shuffle_dataset=False,
                      dataloader_num_workers=0, seed=0, remove_unused_columns=False, disable_dropout=True,
                      gradient_checkpointing=False)  # TRL's default is True; ours does not rematerialise either
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=proc)

    def wrap(obj, name, key, flag=False):
        f = getattr(obj, name)

        def g(*x, **k):
            in_generate[0] = flag
            try:
                with tm(key):
                    return f(*x, **k)
            finally:
                in_generate[0] = False
        setattr(obj, name, g)

    wrap(trainer, "_generate", "generate", flag=True)
    wrap(trainer, "_calculate_rewards", "reward")
    first_prompt = []
    tokenize = trainer._tokenize_prompts

    def tokenize_kept(*x, **k):
        out = tokenize(*x, **k)
        if not first_prompt:
            first_prompt.append([int(t) for t in out[0][0]])
        return out
    trainer._tokenize_prompts = tokenize_kept
    logp = trainer._get_per_token_logps_and_entropies

    def logp_timed(*x, **k):
        with tm("ref_logp" if not torch.is_grad_enabled() else "update_logp"):
            return logp(*x, **k)
    trainer._get_per_token_logps_and_entropies = logp_timed
    per_step, lengths = [], []

    class Steps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            tm.t.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t0
            t = {k: sum(v) for k, v in tm.t.items()}
            prep = t.get("prep_in_generate", 0.0) + t.get("prep_other", 0.0)
            rollout = t.get("generate", 0.0) - t.get("prep_in_generate", 0.0)
            rew, ref = t.get("reward", 0.0), t.get("ref_logp", 0.0)
            per_step.append({"prep": prep, "rollout": rollout, "reward": rew, "ref_logp": ref,
                             "update": total - prep - rollout - rew - ref, "total": total})

        def on_log(self, _a, _s, _c, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer.add_callback(Steps())
    trainer.train()
    _, grid = enc.load_pixels(flat[0])
    ours = enc.prompt_ids(flat[0], int(np.prod(grid)) // img.merge_size ** 2)
    same = first_prompt and first_prompt[0] == list(ours)
    print(f"prompt of record 0: ours {len(ours)} tokens, TRL {len(first_prompt[0]) if first_prompt else '?'} tokens, "
          f"{'identical' if same else 'DIFFERENT'}")
    return per_step, lengths


def table(name, steps):
    keys = ("prep", "rollout", "reward", "ref_logp", "update", "total")
    med = {k: statistics.median(s[k] for s in steps[1:]) for k in keys}
    print(f"{name:>5} " + " ".join(f"{med[k]:9.3f}" for k in keys))
    return med


def main(argv=None):
    a = parse(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="bench_grpo_")
    os.makedirs(work, exist_ok=True)
    ours_dir, hf_dir = prepare_weights(a, work)
    cfg = demo_config(a, ours_dir)
    recs = records(cfg, a.B * (a.steps + 1))
    per = [recs[i * a.B:(i + 1) * a.B] for i in range(a.steps + 1)]
    print(f"GRPO step: B={a.B} prompts x G={a.G} samples, <= {a.new_tokens} new tokens, float32, "
          f"{jax.device_count()} JAX device(s), torch threads {a.threads}; medians of {a.steps} steps (s)")
    ours, ours_len = bench_ours(a, cfg, per)
    trl = trl_len = None
    if not a.skip_trl:
        trl, trl_len = bench_trl(a, cfg, hf_dir, per)
    print(f"{'':>5} " + " ".join(f"{k:>9}" for k in ("prep", "rollout", "reward", "ref_logp", "update", "total")))
    mo = table("ours", ours)
    print(f"      mean completion length {np.mean(ours_len[1:]):.1f}")
    if trl:
        mt = table("TRL", trl)
        print(f"      mean completion length {np.mean(trl_len[1:]) if len(trl_len) > 1 else float('nan'):.1f}")
        print("TRL / ours: " + ", ".join(f"{k} {mt[k] / max(mo[k], 1e-9):.1f}x" for k in
                                         ("rollout", "ref_logp", "update", "total")))
        print(f"step without prep: TRL {mt['total'] - mt['prep']:.3f} s, ours {mo['total'] - mo['prep']:.3f} s, "
              f"{(mt['total'] - mt['prep']) / (mo['total'] - mo['prep']):.1f}x")


if __name__ == "__main__":
    main()
