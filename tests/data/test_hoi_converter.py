"""The HICO-DET simplified-JSON converter (converters.from_hico) and its CLI, on a tiny hand-made file."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.data import converters, hoi


@pytest.fixture()
def hico(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (640, 480), (128, 128, 128)).save(tmp_path / "images" / "HICO_test2015_00000001.jpg")
    data = [
        {"file_name": "HICO_test2015_00000001.jpg", "width": 640, "height": 480,
         "boxes": [[64, 48, 320, 432], [300, 240, 576, 456]], "person_box_idx": 0, "object_box_idx": 1,
         "gt_action": "riding bicycle"},
        {"file_name": "HICO_test2015_00000001.jpg", "width": 640, "height": 480,
         "boxes": [[64, 48, 320, 432], [300, 240, 576, 456], [0, 0, 32, 96], [32, 64, 96, 96]],
         "action": "riding", "object_category": "bicycle", "gt_box_inds": [0, 1, 2, 3], "num_pairs": 2},
        {"file_name": "HICO_test2015_00000001.jpg", "width": 640, "height": 480,
         "boxes": [[64, 48, 64, 432], [300, 240, 576, 456]], "gt_action": "holding cup"},  # zero-width person
    ]
    p = tmp_path / "hico_test_simplified.json"
    p.write_text(json.dumps(data))
    return tmp_path, p


def test_from_hico_records(hico):
    d, p = hico
    rep = converters.ValidationReport()
    out = list(converters.from_hico(str(p), str(d / "images"), str(d), rep))
    assert len(out) == 2 and rep.counts["degenerate_box"] == 1
    ref, grd = (hoi.parse_hoi_record(r, image_root=str(d)) for r in out)
    assert ref.task_type == "referring" and ref.answer_text() == "riding bicycle"
    # pixels -> the 0..1000 grid, q = round(1000 x / W): (64, 48, 320, 432) of 640 x 480 -> (100, 100, 500, 900)
    assert out[0]["refer_boxes"] == [[100, 100, 500, 900], [469, 500, 900, 950]]
    np.testing.assert_allclose([b.box for b in ref.prompt_boxes()][0], [0.1, 0.1, 0.5, 0.9])
    assert [p.kind for p in ref.prompt_boxes()] == [hoi.PERSON, hoi.OBJECT]
    assert grd.task_type == "grounding" and "Who is riding bicycle?" in hoi.render_parts(grd.turns[0].parts)
    boxes = grd.answer_boxes()
    assert [lb for lb, _ in boxes] == ["person", "bicycle", "person", "bicycle"]
    np.testing.assert_allclose(boxes[2][1], [0, 0, 0.05, 0.2])
    bad = tmp = d / "bad.json"
    tmp.write_text(json.dumps([{"file_name": "x.jpg", "width": 10, "height": 10, "boxes": [[0, 0, 5, 5]],
                                "gt_action": "x", "object_box_idx": 3}]))
    with pytest.raises(converters.ConversionError, match=r"bad.json: \[0\]: box index 3"):
        list(converters.from_hico(str(bad), str(d / "images"), str(d)))


def test_hico_cli(hico):
    d, p = hico
    out = d / "hico.jsonl"
    cmd = [sys.executable, "tools/convert_dataset.py", "--format", "hico", "--input", str(p), "--images",
           str(d / "images"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 records" in r.stdout and "degenerate_box: 1" in r.stdout
    recs, rep = hoi.read_hoi_file(str(out))
    assert len(recs) == 2 and rep.records_kept == 2
    p.write_text("[{\"file_name\": \"x.jpg\"}]")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
