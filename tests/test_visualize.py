import numpy as np
from PIL import Image

from coordexp_jax import visualize as V


def test_boxes_are_drawn_where_they_belong(tmp_path):
    img = Image.new("RGB", (64, 48), (0, 0, 0))
    out = V.draw_prediction(img, [{"desc": "cat", "bbox": [8, 8, 32, 24], "score": 0.5}],
                            gt=[{"desc": "cat", "bbox": [40, 30, 60, 44]}], min_side=128)
    a = np.asarray(out)
    assert out.size == (128, 96)
    # Left edge of the predicted box (x=16 after the 2x upscale) is red; of the gt box (x=80) green.
    assert tuple(a[40, 16]) == V.PRED_COLOUR
    assert tuple(a[70, 80]) == V.GT_COLOUR
    assert tuple(a[5, 120]) == (0, 0, 0)
    out.save(tmp_path / "x.png")
    page = V.write_html(str(tmp_path), [{"image": "x.png", "caption": "<b>1</b>"}], summary={"AP50": 0.5})
    text = open(page).read()
    assert "x.png" in text and "&lt;b&gt;1&lt;/b&gt;" in text and "0.5000" in text
