"""The periodic evaluation of the training loop: rollouts on held-out images scored by `coordexp_jax.evaluate`.

`detection_eval_hook(cfg, comps)` returns `hook(model, step, workdir) -> metrics`: greedy rollouts of up to
`eval.num_images` eval records with the jitted sampler (compiled once, the weights swapped in at each call),
parsed, scored (COCO AP/AP50 of the emitted tokens and of the expectation boxes, F1, parse failures) and written
with `eval.num_pictures` prediction pictures to `workdir/eval/step_N/` (`metrics_log.eval_dir`). The metrics also
go to metrics.jsonl with `kind = "eval"`, and `minutes` (training time so far) for AP-vs-minutes curves.
The loop's `MetricsWriter` then sends the `log.num_pictures` worst of these pictures (read from the folder's
`per_image.json`, with their prompt and answer as captions) to TensorBoard and W&B; so that there are that many,
the evaluation draws at least `log.num_pictures` pictures when TensorBoard or W&B is on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from flax import nnx

from coordexp_jax.train.metrics_log import eval_dir

log = logging.getLogger(__name__)


def detection_eval_hook(cfg, comps, t_start: float | None = None):
    """A loop eval hook, or None when the config has no eval records (data.num_eval == 0 / no eval path).
    HOI runs (data.kind 'hoi') get `hoi_eval_hook`."""
    if cfg.data.kind == "hoi":
        return hoi_eval_hook(cfg, comps, t_start)
    if not comps.extra.get("eval_specs") or cfg.eval.num_images == 0 or comps.token_ids is None:
        return None
    from coordexp_jax.evaluate import eval_setup, evaluate_records, make_sampler

    records, encoder, ecfg = eval_setup(cfg, comps.model_config)
    n_log = cfg.log.num_pictures if (cfg.train.tensorboard or cfg.log.wandb.project) else 0
    if ecfg.num_pictures and n_log > ecfg.num_pictures:  # (0 = a picture for every image)
        ecfg = dataclasses.replace(ecfg, num_pictures=n_log)
    box: dict = {}
    t0 = time.time() if t_start is None else t_start

    def hook(model, step, workdir):
        graphdef, state = nnx.split(model)
        if "sampler" not in box:  # compile once; later calls only swap the weights in
            box["sampler"] = make_sampler((graphdef, state), comps.token_ids, cfg)
        sampler = box["sampler"]
        sampler.state = state
        out_dir = eval_dir(workdir, step)
        run_info = {"checkpoint": os.path.abspath(workdir), "step": int(step), "config": cfg.name}
        m = evaluate_records(sampler, records, encoder, model_config=comps.model_config, config=ecfg,
                             out_dir=out_dir, progress=False, run_info=run_info)
        res = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        res["minutes"] = (time.time() - t0) / 60
        return res

    return hook


def hoi_eval_hook(cfg, comps, t_start: float | None = None):
    """The evaluation of an HOI run (`evaluate_hoi`): greedy rollouts of the held-out HOI records (up to
    `eval.num_images` of each task) with the prompt boxes' links at prefill, referring exact match / token F1 (and
    BERTScore with `eval.bertscore_model`), grounding AR, pictures and attention heatmaps in `workdir/eval/step_N/`.
    None when the run has no held-out HOI records."""
    recs = comps.extra.get("hoi_eval_records") or []
    if not recs or cfg.eval.num_images == 0 or comps.token_ids is None:
        return None
    from coordexp_jax.evaluate import make_sampler
    from coordexp_jax.evaluate_hoi import evaluate_hoi_records, hoi_eval_setup, make_link_attention

    records, encoder, collator, ecfg = hoi_eval_setup(cfg, comps.model_config, recs, comps.extra["prompt_config"],
                                                      comps.tokenizer_dir)
    box: dict = {}
    t0 = time.time() if t_start is None else t_start

    def hook(model, step, workdir):
        graphdef, state = nnx.split(model)
        if "sampler" not in box:  # compile once; later calls only swap the weights in
            box["sampler"] = make_sampler((graphdef, state), comps.token_ids, cfg)
            box["attention"] = make_link_attention(model)
        sampler, attention = box["sampler"], box["attention"]
        sampler.state = state
        if attention is not None:
            attention.set_state(state)
        out_dir = eval_dir(workdir, step)
        run_info = {"checkpoint": os.path.abspath(workdir), "step": int(step), "config": cfg.name}
        m = evaluate_hoi_records(sampler, records, encoder, collator, config=ecfg, out_dir=out_dir,
                                 link_attention=attention, progress=False, run_info=run_info)
        res = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        res["minutes"] = (time.time() - t0) / 60
        return res

    return hook
