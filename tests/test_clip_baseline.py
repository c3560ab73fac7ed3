"""CLIP two-tower baseline: exact search against a naive reference, and the run file / metrics CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from avg.artifacts.emb import save_emb
from avg.artifacts.runfiles import read_run
from avg.stages.eval_clip_baseline import main
from avg.search.exact import exact_search


def _naive_topk(text, image, k):
    scores = text.astype(np.float64) @ image.astype(np.float64).T
    # stable argsort of -score: ties go to the lower image row
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, 1)


@pytest.mark.parametrize("k,batch_size", [(1, 7), (5, 3), (40, 64), (100, 16)])
def test_exact_search_matches_naive_argsort(k, batch_size):
    rng = np.random.default_rng(k)
    text = rng.normal(size=(23, 16)).astype(np.float32)
    image = rng.normal(size=(40, 16)).astype(np.float32)
    idx, scores = exact_search(text, image, k=k, batch_size=batch_size, device="cpu")
    ref_idx, ref_scores = _naive_topk(text, image, min(k, 40))
    assert idx.shape == (23, min(k, 40)) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_exact_search_breaks_ties_by_image_row():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    text = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # row 0, 2, 3 tie for query 0; k=2 cuts through the tie, k=4 does not
    idx2, _ = exact_search(text, image, k=2, device="cpu")
    idx4, _ = exact_search(text, image, k=4, device="cpu")
    assert idx2[0].tolist() == [0, 2]
    assert idx4[0].tolist() == [0, 2, 3, 4]
    assert idx4[1].tolist()[0] == 1
    np.testing.assert_array_equal(idx4, _naive_topk(text, image, 4)[0])


def test_cli_writes_run_file_and_metrics_on_hand_built_case(tmp_path):
    # 3 test images along the axes, 1 train image (must not be in the gallery); 4 test captions:
    # q0 -> img a (rank 1), q1 -> img b but closest to c (rank 2), q2 -> img c (rank 1),
    # q3 -> img a but pointing at b then c (rank 3).
    images = [{"image_id": "a", "file": "a.png", "split": "test"},
              {"image_id": "train0", "file": "t.png", "split": "train"},
              {"image_id": "b", "file": "b.png", "split": "test"},
              {"image_id": "c", "file": "c.png", "split": "test"}]
    img = np.array([[1, 0, 0], [0.9, 0.1, 0.1], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    caps = [("q0", 0, [1, 0, 0]), ("q1", 2, [0, 0.6, 0.8]), ("q2", 3, [0.1, 0, 1]), ("q3", 0, [0, 0.8, 0.6]), ("train cap", 1, [1, 0, 0])]
    captions = [{"text": t, "image_row": r, "split": images[r]["split"]} for t, r, _ in caps]
    txt = np.array([v for _, _, v in caps], dtype=np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    emb = save_emb(tmp_path / "emb", img.astype(np.float16), txt.astype(np.float16), images, captions,
                   encoder={"backend": "test", "model": "hand", "pretrained": None, "normalized": True})
    metrics = main(["--emb-dir", str(emb), "--split", "test", "--out-dir", str(tmp_path / "eval")])
    run = read_run(tmp_path / "eval" / "run_clip_test.jsonl")
    assert [r.query for r in run] == ["q0", "q1", "q2", "q3"]
    assert [r.gold for r in run] == ["a", "b", "c", "a"]
    assert run[0].ranked[0] == "a" and run[1].ranked[:2] == ["c", "b"] and run[3].ranked == ["b", "c", "a"]
    assert all("train0" not in r.ranked for r in run)
    assert metrics["R@1"] == pytest.approx(50.0) and metrics["R@5"] == pytest.approx(100.0)
    assert metrics["mean_rank"] == pytest.approx((1 + 2 + 1 + 3) / 4)
    assert metrics["gallery_size"] == 3 and metrics["num_queries"] == 4
    saved = json.loads((tmp_path / "eval" / "metrics_clip_test.json").read_text())
    assert saved["R@1"] == metrics["R@1"] and saved["encoder"]["model"] == "hand"
