"""Fusion preset: COCO detection + RefCOCO grounding (+ a little of the synthetic set), by weight.

Records in the project's JSONL contract (tools/convert_dataset.py writes them). Use with
`--config.data.kind=fusion --config.data.path=configs/fusion/coco_refcoco.py`.
"""

from coordexp_jax.data.pipeline import fusion_config


def get_config():
    return fusion_config([
        dict(name="coco", path="data/coco/train2017.jsonl", weight=3.0),
        dict(name="refcoco", path="data/refcoco/train.jsonl", weight=1.0, task="grounding"),
    ])
