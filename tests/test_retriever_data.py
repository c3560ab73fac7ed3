"""Retriever data files, the code -> image gallery mapping, batching and stage-2 candidates."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from avg.metrics import first_hit_rank, retrieval_metrics
from avg.stages import prepare_retriever_dataset as prepare_dataset
from avg.retriever.data import load_queries, read_codes
from avg.train.batches import EpochBatchSampler
from avg.search.gallery import Gallery
from avg.objectives.retrieval import build_candidates
from avg.core.io import InputError


def make_inputs(tmp_path, *, drop_code=("tr3.jpg",)):
    images = []
    splits = {"tr0.jpg": "train", "tr1.jpg": "train", "tr2.jpg": "restval", "tr3.jpg": "train",
              "va0.jpg": "val", "va1.jpg": "val", "te0.jpg": "test", "te1.jpg": "test"}
    for name, split in splits.items():
        images.append({"filename": name, "split": split,
                       "sentences": [{"raw": f"caption {k} of {name}"} for k in range(2)]})
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps({"images": images}))
    codes = {name: {"code": [i % 4, i // 4, 0], "split": "train" if s == "restval" else s}
             for i, (name, s) in enumerate(splits.items()) if name not in drop_code}
    cdir = tmp_path / "codes"
    cdir.mkdir()
    (cdir / "codes.json").write_text(json.dumps({
        "num_levels": 2, "codebook_size": 4, "shared_codebook": True, "code_len": 3, "disambiguation": True,
        "disambiguation_size": 2, "tie_rule": "test", "encoder": {}, "images": codes}))
    np.save(cdir / "codebook.npy", np.zeros((1, 4, 8), np.float32))
    return ann, cdir


def test_prepare_dataset_files_and_no_test_captions_in_train(tmp_path, caplog):
    ann, cdir = make_inputs(tmp_path)
    out = tmp_path / "rd"
    meta = prepare_dataset.main(["--annotations", str(ann), "--codes-dir", str(cdir), "--out-dir", str(out)])
    for s in ("train", "val", "test"):
        assert (out / f"{s}.jsonl").is_file() and (out / f"gallery_{s}.json").is_file()
    train = load_queries(out / "train.jsonl", code_len=3)
    test = load_queries(out / "test.jsonl", code_len=3)
    assert len(train) == 3 * 2  # tr3 has no code: skipped and counted
    assert meta["images_without_code"] == {"train": 1}
    assert len(test) == 4 and {q["image_id"] for q in test} == {"te0.jpg", "te1.jpg"}
    assert not {q["query"] for q in test} & {q["query"] for q in train}
    assert not any("te" in q["image_id"] or "va" in q["image_id"] for q in train)
    assert json.loads((out / "gallery_test.json").read_text()) == {"te0.jpg": [2, 1, 0], "te1.jpg": [3, 1, 0]}
    saved = json.loads((out / "meta.json").read_text())
    assert saved["transductive"] is False and saved["counts"]["val"] == {"queries": 4, "images": 2, "colliding_images": 0}
    capped = prepare_dataset.main(["--annotations", str(ann), "--codes-dir", str(cdir), "--out-dir", str(out),
                                   "--max-train-queries", "4", "--seed", "1", "--force"])  # another configuration
    kept = load_queries(out / "train.jsonl")
    assert len(kept) == 4 and capped["train_queries_before_cap"] == 6
    assert {q["query"] for q in kept} < {q["query"] for q in train}


def test_pseudo_queries_on_test_images_are_transductive(tmp_path, caplog):
    ann, cdir = make_inputs(tmp_path)
    pq = tmp_path / "pq.jsonl"
    rows = [{"query": "a new text for te0", "image_id": "te0.jpg", "source_image_id": "tr0.jpg", "split": "test", "transductive": True},
            {"query": "caption 0 of te0.jpg", "image_id": "te0.jpg", "source_image_id": "tr0.jpg", "split": "test", "transductive": True},
            {"query": "another text for tr1", "image_id": "tr1.jpg", "source_image_id": "tr0.jpg", "split": "train", "transductive": False}]
    pq.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rd"
    logger = logging.getLogger("avg.stages.prepare_retriever_dataset")
    logger.addHandler(caplog.handler)
    try:
        meta = prepare_dataset.main(["--annotations", str(ann), "--codes-dir", str(cdir), "--out-dir", str(out),
                                     "--pseudo-queries", str(pq)])
    finally:
        logger.removeHandler(caplog.handler)
    assert meta["transductive"] is True
    assert json.loads((out / "meta.json").read_text())["transductive"] is True
    assert "TRANSDUCTIVE" in caplog.text
    train = [q["query"] for q in load_queries(out / "train.jsonl")]
    assert "a new text for te0" in train and "another text for tr1" in train
    assert "caption 0 of te0.jpg" not in train  # a held-out image's own caption never enters train
    assert meta["pseudo_queries"]["dropped_own_caption_of_heldout_image"] == 1


def test_bad_inputs_name_file_and_record(tmp_path):
    ann, cdir = make_inputs(tmp_path)
    data = json.loads((cdir / "codes.json").read_text())
    data["images"]["tr0.jpg"]["code"] = [1, 2]
    (cdir / "codes.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"codes\.json.*tr0\.jpg"):
        read_codes(cdir)
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"query": "ok", "image_id": "a", "code": [1, 2, 3]}) + "\n" +
                   json.dumps({"query": "", "image_id": "b", "code": [1, 2, 3]}) + "\n")
    with pytest.raises(InputError, match=r"train\.jsonl: record 2"):
        load_queries(bad)
    out = tmp_path / "never"
    with pytest.raises(InputError):
        prepare_dataset.main(["--annotations", str(ann), "--codes-dir", str(cdir), "--out-dir", str(out)])
    assert not out.exists()  # no partial output


def test_gallery_collisions_are_seeded_and_ranked_per_image():
    ids = ["a", "b", "c", "d", "e"]
    codes = [[1, 1], [1, 1], [1, 1], [2, 0], [3, 3]]  # a, b, c collide
    g = Gallery(ids, codes, seed=0)
    order = g.images_for([1, 1])
    assert sorted(order) == ["a", "b", "c"] and g.num_colliding_images == 3
    assert Gallery(ids, codes, seed=0).images_for([1, 1]) == order  # reproducible
    expected = [["a", "b", "c"][i] for i in np.random.default_rng([0, 1, 1]).permutation(3)]
    assert order == expected  # the documented rule
    orders = {tuple(Gallery(ids, codes, seed=s).images_for([1, 1])) for s in range(10)}
    assert len(orders) > 1  # the seed matters
    ranked, scores = g.rank([[1, 1], [2, 0], [1, 1], [9, 9]], [-0.1, -0.5, -0.7, -0.9])
    assert ranked == order + ["d"] and scores == [-0.1] * 3 + [-0.5]  # each image once, unknown code dropped
    # three images share the top code: only the one listed first is a hit at 1
    records = [{"qid": i, "query": "q", "gold": img, "ranked": ranked} for i, img in enumerate(["a", "b", "c"])]
    m = retrieval_metrics(records, gallery_size=len(g))
    assert m["R@1"] == pytest.approx(100 / 3) and m["mean_rank"] == pytest.approx(2.0)
    assert [first_hit_rank(ranked, x) for x in order] == [1, 2, 3]


def test_gallery_load_validates(tmp_path):
    p = tmp_path / "gallery_val.json"
    p.write_text(json.dumps({"x": [1, 2], "y": [1, -2]}))
    with pytest.raises(InputError, match="gallery_val.json.*'y'"):
        Gallery.load(p)


def test_epoch_batch_sampler_is_seeded_resumable_and_sharded():
    s = EpochBatchSampler(10, 3, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0 and sorted(sum(list(s), [])) == list(range(10))
    s.set_epoch(0, skip_batches=2)
    assert list(s) == e0[2:]
    shards = [EpochBatchSampler(10, 3, seed=1, rank=r, world_size=3) for r in range(3)]
    for sh in shards:
        sh.set_epoch(0)
    assert len({len(list(sh)) for sh in shards}) == 1  # equal batch counts per rank
    assert set(i for sh in shards for b in sh for i in b) == set(range(10))


def test_build_candidates_positive_present_missing_and_short():
    seqs = torch.tensor([[[1, 1], [2, 2], [3, 3]],
                         [[1, 1], [2, 2], [3, 3]],
                         [[1, 1], [-1, -1], [-1, -1]]])
    valid = torch.tensor([3, 3, 1])
    pos = torch.tensor([[2, 2], [9, 9], [9, 9]])
    cands, mask, idx = build_candidates(seqs, valid, pos, generator=torch.Generator().manual_seed(0))
    assert idx[0] == 1 and torch.equal(cands[0], seqs[0])                 # present: untouched
    j = int(idx[1])
    assert cands[1, j].tolist() == [9, 9] and mask[1].all()               # missing, full: replaced
    assert (cands[1] == seqs[1]).all(-1).sum() == 2
    again = build_candidates(seqs, valid, pos, generator=torch.Generator().manual_seed(0))[2]
    assert torch.equal(again, idx)                                         # seeded
    assert idx[2] == 1 and mask[2].tolist() == [True, True, False]        # short list: first empty slot
    assert (cands >= 0).all()                                              # empty slots hold a real code
