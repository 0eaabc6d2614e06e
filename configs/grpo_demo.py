"""GRPO on the synthetic grounding set, continuing the demo's Stage-1 model (train.kind = 'grpo').

    python -m coordexp_jax.train --config configs/demo.py --workdir runs/demo                  # Stage-1 first
    python -m coordexp_jax.train --config configs/grpo_demo.py --workdir runs/grpo_demo \
        --config.model.checkpoint=runs/demo/final_model

The demo's Stage-1 model lists every object of an image (tags protocol). Here each prompt names one object by a
referring phrase ("the large red circle", synthetic `<split>_grounding.jsonl`); G = 8 answers are sampled per
prompt at temperature 1 and rewarded with the single-box rewards of the MMKD-RL-Grounding recipe (Gaussian point
and Gaussian plane of the first box, coordexp_method.md §8; not its optional format reward, see below), so the
model learns to put the named object first.
The held-out evaluation (greedy) reports the mean reward, the parse rate and Acc@0.5. docs/training.md compares it
with continued SFT on the same records for the same wall-clock time.
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.name = "grpo_demo"
    c.train.kind = "grpo"
    c.model.checkpoint = "runs/demo/final_model"  # the Stage-1 demo model (override on the command line)
    c.data.synthetic_task = "grounding"  # same images as the demo, one record per uniquely described object
    c.data.batch_size = 8  # prompts per step: 8 x G = 64 rollouts
    c.grpo.num_generations = 8
    c.grpo.temperature = 1.0
    c.grpo.max_new_tokens = 64  # a 4-object detection answer is ~49 tokens; a grounding answer ~13
    c.grpo.rewards.multi_box_format = 0.0
    c.grpo.rewards.multi_gaussian_point = 0.0
    c.grpo.rewards.multi_gaussian_plane = 0.0
    # The single-box rewards of the recipe without its optional format reward: with format 1 the policy collapsed
    # to empty answers within 20 steps (an empty tags answer always parses: format 1, no box to be wrong about).
    # A parse failure still scores 0 on both Gaussian rewards.
    c.grpo.rewards.format = 0.0
    c.grpo.rewards.gaussian_point = 1.0
    c.grpo.rewards.gaussian_plane = 1.0
    c.grpo.beta = 0.04
    c.grpo.epsilon = 0.2
    c.grpo.epsilon_high = 0.2
    c.grpo.mu = 1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.train.steps = 400
    c.train.max_minutes = 10.0
    c.train.log_every = 1
    c.train.ckpt_every = 50
    c.eval.every = 0
    c.eval.at_end = True
    c.eval.num_images = 64
    c.eval.max_new_tokens = 64
    return c
