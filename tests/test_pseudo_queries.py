import json
import subprocess
import sys

import numpy as np

from avg.artifacts.emb import load_emb, save_emb
from avg.data.pseudo_queries import caption_transfer


def _emb(tmp_path):
    # 3 orthogonal training images with 2 captions each; test images close to train 2 and train 0.
    eye = np.eye(4, dtype=np.float16)
    img = np.stack([eye[0], eye[1], eye[2], 0.9 * eye[2] + 0.1 * eye[3], 0.8 * eye[0] + 0.2 * eye[1]]).astype(np.float16)
    splits = ["train", "train", "train", "test", "test"]
    images = [{"image_id": f"im{i}", "file": f"im{i}.png", "split": s} for i, s in enumerate(splits)]
    captions, txt = [], []
    for i in range(3):
        for c in range(2):
            captions.append({"text": f"caption {i}.{c}", "image_row": i, "split": "train"})
            txt.append(img[i])
    captions.append({"text": "TEST CAPTION must never be transferred", "image_row": 3, "split": "test"})
    txt.append(img[3])
    save_emb(tmp_path / "emb", img, np.stack(txt), images, captions, encoder={"backend": "x", "model": "x", "pretrained": "x", "normalized": False})
    return load_emb(tmp_path / "emb")


def test_test_images_get_captions_of_nearest_train_images(tmp_path):
    recs = caption_transfer(_emb(tmp_path), "test", neighbors=2, per_image=3)
    by_img = {}
    for r in recs:
        by_img.setdefault(r["image_id"], []).append(r)
        assert r["transductive"] is True and r["split"] == "test"
        assert "TEST CAPTION" not in r["query"]
    assert [r["query"] for r in by_img["im3"]][:2] == ["caption 2.0", "caption 2.1"]
    assert by_img["im3"][0]["source_image_id"] == "im2"
    assert by_img["im4"][0]["source_image_id"] == "im0"
    assert all(len(v) == 3 for v in by_img.values())


def test_train_split_never_uses_itself(tmp_path):
    recs = caption_transfer(_emb(tmp_path), "train", neighbors=1, per_image=2)
    assert all(r["source_image_id"] != r["image_id"] for r in recs)
    assert all(r["transductive"] is False for r in recs)


def test_tool_writes_jsonl(tmp_path):
    _emb(tmp_path)
    out = tmp_path / "pq" / "test.jsonl"
    res = subprocess.run([sys.executable, "tools/generate_pseudo_query.py", "--emb-dir", str(tmp_path / "emb"), "--split", "test", "--out", str(out), "--per-image", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and "TRANSDUCTIVE" in res.stderr
    bad = subprocess.run([sys.executable, "tools/generate_pseudo_query.py", "--emb-dir", str(tmp_path / "nope"), "--split", "test", "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr and not (tmp_path / "x.jsonl").exists()
