"""Layout vokens (avg.models.layout): codes of the ViT patch grid that carry where things are, after the RQ-VAE's M.
Hand-made grids whose only difference is which cell holds an object: the residual and the region codes tell them
apart where the pooled vector cannot; then train_rqvae --layout -> generate_codes writes M + L vokens per image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avg.artifacts.codes import load_codebook, load_codes
from avg.artifacts.emb import save_emb
from avg.core.io import InputError
from avg.models.layout import LayoutConfig, LayoutQuantizer, region_masks
from avg.models.rqvae import RQVAE
from avg.retriever.data import read_codes
from avg.retriever.vocab import VokenVocab
from avg.stages import generate_codes as gc
from avg.stages import train_rqvae as train_mod


def object_grids(n_per_cell=6, side=4, width=8, seed=0):
    """Images on one background whose object sits in one of side*side cells: [n, cells, width], and each one's cell."""
    rng = np.random.default_rng(seed)
    bg, obj = rng.normal(size=width), rng.normal(size=width)
    grids, cells = [], []
    for cell in range(side * side):
        for _ in range(n_per_cell):
            g = np.tile(bg, (side * side, 1)) + 0.01 * rng.normal(size=(side * side, width))
            g[cell] += 3 * obj
            grids.append(g)
            cells.append(cell)
    return torch.tensor(np.array(grids), dtype=torch.float32), np.array(cells)


def test_region_masks_cut_quadrants_and_columns():
    q = region_masks(4, 4)
    assert q.shape == (4, 16) and q.sum(1).tolist() == [4, 4, 4, 4]
    assert q[0].view(4, 4)[:2, :2].all() and q[3].view(4, 4)[2:, 2:].all()  # top left, bottom right
    thirds = region_masks(3, 3)
    assert thirds[0].view(3, 3)[:, 0].all() and not thirds[0].view(3, 3)[:, 2].any()  # the left column
    with pytest.raises(ValueError):
        region_masks(4, 5)


def test_residual_codes_tell_the_object_cell_apart_and_decode_to_it():
    grid, cells = object_grids()
    q = LayoutQuantizer.fit(grid, LayoutConfig(mode="residual", levels=2, codebook_size=16, dim=8), seed=0)
    codes = q.encode(grid)
    assert codes.shape == (len(cells), 2) and codes.dtype == torch.int64
    # the first level alone already holds the cell: images of one cell share it, of two cells differ
    by_cell = {c: {int(x) for x in codes[cells == c, 0]} for c in set(cells.tolist())}
    assert all(len(v) == 1 for v in by_cell.values()) and len({min(v) for v in by_cell.values()}) == 16
    # what a code keeps (decode) is closest, among the 16 layouts, to its own
    centres = torch.stack([q.project(q.features(grid[cells == c]))[:, 0].mean(0) for c in range(16)])
    assert (torch.cdist(q.decode(codes), centres).argmin(1).numpy() == cells).all()
    # seeded: the same fit twice gives the same codes
    again = LayoutQuantizer.fit(grid, LayoutConfig(mode="residual", levels=2, codebook_size=16, dim=8), seed=0)
    assert torch.equal(again.encode(grid), codes)


def test_region_codes_put_the_object_in_its_quadrant(tmp_path):
    grid, cells = object_grids()
    q = LayoutQuantizer.fit(grid, LayoutConfig(mode="regions", levels=4, codebook_size=8, dim=8), seed=0)
    codes = q.encode(grid)
    assert codes.shape == (len(cells), 4)
    quadrant = [(c // 4 >= 2) * 2 + (c % 4 >= 2) for c in cells]   # which quadrant holds the object
    for r in range(4):
        inside = codes[np.array(quadrant) == r, r]
        outside = codes[np.array(quadrant) != r, r]
        assert not set(inside.tolist()) & set(outside.tolist())  # a region's voken says whether the object is there
    q.save_pretrained(tmp_path / "q")
    loaded = LayoutQuantizer.from_pretrained(tmp_path / "q")
    assert torch.equal(loaded.encode(grid), codes) and loaded.config == q.config
    (tmp_path / "q" / "layout.json").write_text(json.dumps({"model_type": "something else"}))
    with pytest.raises(InputError, match="not a layout quantizer"):
        LayoutQuantizer.from_pretrained(tmp_path / "q")


def test_train_rqvae_with_layout_then_generate_codes_writes_m_plus_l_vokens(tmp_path):
    grid, cells = object_grids(n_per_cell=4)
    n = grid.shape[0]
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(n, 8)).astype(np.float16)
    images = [{"image_id": f"im{i:03d}", "file": f"{i}.jpg", "split": "train" if i % 5 else "test"} for i in range(n)]
    captions = [{"text": f"c{i}", "image_row": i, "split": images[i]["split"]} for i in range(n)]
    enc = {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": False}
    emb_dir = save_emb(tmp_path / "emb", pooled, pooled.copy(), images, captions, enc, image_grid=grid.numpy().astype(np.float16))
    args = ["--emb-dir", str(emb_dir), "--out-dir", str(tmp_path / "rq"), "--epochs", "2", "--batch-size", "16",
            "--num-levels", "2", "--codebook-size", "16", "--latent-dim", "8", "--hidden-dims", "16", "--kmeans-samples", "32",
            "--device", "cpu", "--layout", "residual", "--layout-levels", "2", "--layout-position", "last"]
    train_mod.main(args)
    assert (tmp_path / "rq" / "layout.json").is_file()
    gc.main(["--rqvae-dir", str(tmp_path / "rq"), "--emb-dir", str(emb_dir), "--out-dir", str(tmp_path / "codes")])
    codes = load_codes(tmp_path / "codes")
    assert codes.num_levels == codes.code_len == 4 and codes.shared_codebook is False and not codes.disambiguation
    assert codes.layout == {"mode": "residual", "levels": 2, "position": "last", "entries": 16, "score": "level"}
    assert codes.evidence_levels == [2, 3]  # scored over their level's alphabet (avg.search.code_index)
    vocab = VokenVocab.from_meta(read_codes(tmp_path / "codes").meta)
    assert vocab.evidence_levels == [2, 3] and VokenVocab.from_meta(vocab.to_dict()).evidence_levels == [2, 3]
    assert load_codebook(tmp_path / "codes").shape == (4, 16, 8)  # the shared RQ-VAE book repeated, then the layout's
    stats = json.loads((tmp_path / "codes" / "stats.json").read_text())
    assert stats["layout"]["pooled_levels_collision_rate"] >= stats["raw_collision_rate"]
    # the layout vokens tell apart images of the same pooled code whose object sits elsewhere
    layout = {tuple(v["code"][2:]) for v in codes.images.values()}
    assert len(layout) >= 16
    # tools/probe_demo_features.py --codes probes what the codes keep: the RQ-VAE's decoding, then the layout's
    probe = _probe_tool()
    ids = [im["image_id"] for im in images]
    table = torch.tensor([codes.code(i) for i in ids])
    got = probe.decoded_codes(tmp_path / "codes", tmp_path / "rq", ids)
    rq, lay = RQVAE.from_pretrained(tmp_path / "rq"), LayoutQuantizer.from_pretrained(tmp_path / "rq")
    torch.testing.assert_close(got, torch.cat([rq.decode_codes(table[:, :2]), lay.decode(table[:, 2:])], 1).detach())
    with pytest.raises(InputError, match="no code for image 'nope'"):
        probe.decoded_codes(tmp_path / "codes", tmp_path / "rq", ["nope"])
    # a layout tokenizer needs the grid
    no_grid = save_emb(tmp_path / "emb2", pooled, pooled.copy(), images, captions, enc)
    with pytest.raises(InputError, match="image_grid.npy"):
        train_mod.main([*args[:1], str(no_grid), *args[2:3], str(tmp_path / "rq2"), *args[4:]])


def _probe_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_demo_features", Path(__file__).resolve().parents[1] / "tools" / "probe_demo_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coarse_layout_vokens_open_the_code_and_their_unused_entries_are_zero_rows(tmp_path):
    grid, cells = object_grids(n_per_cell=4)
    n = grid.shape[0]
    pooled = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float16)
    images = [{"image_id": f"im{i:03d}", "file": f"{i}.jpg", "split": "train" if i % 5 else "test"} for i in range(n)]
    captions = [{"text": f"c{i}", "image_row": i, "split": images[i]["split"]} for i in range(n)]
    enc = {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": False}
    emb_dir = save_emb(tmp_path / "emb", pooled, pooled.copy(), images, captions, enc, image_grid=grid.numpy().astype(np.float16))
    train_mod.main(["--emb-dir", str(emb_dir), "--out-dir", str(tmp_path / "rq"), "--epochs", "1", "--batch-size", "16",
                    "--num-levels", "2", "--codebook-size", "16", "--latent-dim", "8", "--hidden-dims", "16",
                    "--kmeans-samples", "32", "--device", "cpu", "--layout", "residual", "--layout-levels", "1",
                    "--layout-size", "4"])
    gc.main(["--rqvae-dir", str(tmp_path / "rq"), "--emb-dir", str(emb_dir), "--out-dir", str(tmp_path / "codes")])
    codes = load_codes(tmp_path / "codes")
    assert codes.layout == {"mode": "residual", "levels": 1, "position": "first", "entries": 4, "score": "level"}
    assert codes.code_len == 3 and codes.evidence_levels == [0]
    first = np.array([v["code"][0] for v in codes.images.values()])
    assert set(first.tolist()) <= set(range(4)) and len(set(first.tolist())) == 4  # four coarse layouts, first
    book = load_codebook(tmp_path / "codes")
    assert book.shape == (3, 16, 8) and not book[0, 4:].any() and book[0, :4].any()  # unused entries: zero rows
    ids = list(codes.images)
    table = torch.tensor([codes.code(i) for i in ids])
    rq, lay = RQVAE.from_pretrained(tmp_path / "rq"), LayoutQuantizer.from_pretrained(tmp_path / "rq")
    torch.testing.assert_close(_probe_tool().decoded_codes(tmp_path / "codes", tmp_path / "rq", ids),  # layout first
                               torch.cat([rq.decode_codes(table[:, 1:]), lay.decode(table[:, :1])], 1).detach())
    with pytest.raises(InputError, match="--layout-size 32"):
        train_mod.main(["--emb-dir", str(emb_dir), "--out-dir", str(tmp_path / "rq2"), "--epochs", "1", "--codebook-size",
                        "16", "--latent-dim", "8", "--hidden-dims", "16", "--layout", "residual", "--layout-size", "32"])


def test_evidence_levels_follow_the_layout_score_and_a_bad_header_is_refused(tmp_path):
    from types import SimpleNamespace

    def lay(**kw):
        return SimpleNamespace(config=LayoutConfig(levels=2, cells=16, **kw))

    assert gc.evidence_levels(None, 4) == []
    assert gc.evidence_levels(lay(position="last"), 4) == [4, 5]
    assert gc.evidence_levels(lay(position="first"), 4) == [0, 1]
    assert gc.evidence_levels(lay(position="last", score="children"), 4) == []
    with pytest.raises(ValueError, match="layout score"):
        LayoutConfig(score="vocab")
    header = {"num_levels": 2, "codebook_size": 4, "shared_codebook": False, "code_len": 2, "disambiguation": False,
              "disambiguation_size": 0, "tie_rule": "none", "encoder": {}, "evidence_levels": [2]}
    (tmp_path / "codes.json").write_text(json.dumps({**header, "images": {"a": {"code": [0, 1], "split": "train"}}}))
    with pytest.raises(InputError, match="codes.json: evidence_levels"):
        load_codes(tmp_path)
    with pytest.raises(InputError, match="evidence_levels"):
        VokenVocab.from_meta({**header, "evidence_levels": [0, 0]}, source="x/codes.json")
