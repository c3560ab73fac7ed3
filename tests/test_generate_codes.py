"""Voken codes: collision handling, the codes artifact and train -> generate_codes end to end."""
import json

import numpy as np
import pytest
import torch

from avg.artifacts.codes import collision_stats, load_codebook, load_codes
from avg.artifacts.emb import save_emb
from avg.models.rqvae import RQVAE, RQVAEConfig
from avg.stages import generate_codes as gc
from avg.stages import train_rqvae as train_mod
from avg.core.io import InputError


def make_emb(out, n=60, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float16)
    images = [{"image_id": f"im{i:03d}", "file": f"{i}.jpg", "split": "train" if i < 40 else "test"} for i in range(n)]
    captions = [{"text": f"c{i}", "image_row": i, "split": images[i]["split"]} for i in range(n)]
    enc = {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": False}
    return save_emb(out, img, img.copy(), images, captions, enc)


def test_disambiguate_orders_groups_by_error_then_id():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [3, 3]])
    errors = np.array([0.5, 9.0, 0.1, 0.5, 1.0], dtype=np.float32)
    ids = ["b", "z", "c", "a", "y"]
    out, k = gc.disambiguate(codes, errors, ids)
    assert k == 3 and out.shape == (5, 3)
    # group [1,2]: c (0.1) first, then a and b tie at 0.5 -> a before b; singletons get 0
    assert out[:, 2].tolist() == [2, 0, 0, 1, 0]
    assert len({tuple(r) for r in out.tolist()}) == 5
    same, k1 = gc.disambiguate(np.array([[0], [1]]), np.zeros(2, np.float32), ["a", "b"])
    assert k1 == 1 and same.shape == (2, 1)  # nothing collides: no extra position


def test_collision_stats_by_hand():
    s = collision_stats(np.array([[0, 1], [0, 1], [0, 1], [2, 1]]), codebook_size=4)
    assert s["collision_rate"] == pytest.approx(0.5) and s["num_colliding_images"] == 3 and s["largest_group"] == 3
    assert s["levels"][0]["usage"] == 0.5 and s["levels"][1]["usage"] == 0.25
    assert s["levels"][0]["perplexity"] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert s["levels"][1]["perplexity"] == pytest.approx(1.0)


def tiny_rqvae(tmp_path, n=2, m=1):
    """A real (untrained) tokenizer so small that 60 images must collide."""
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=8, hidden_dims=[8], latent_dim=3, num_levels=m, codebook_size=n))
    return model.save_pretrained(tmp_path / "rqvae")


def test_forced_collisions_become_unique_and_deterministic(tmp_path):
    emb = make_emb(tmp_path / "emb")
    rq = tiny_rqvae(tmp_path)
    args = ["--rqvae-dir", str(rq), "--emb-dir", str(emb), "--batch-size", "7", "--device", "cpu"]
    stats = gc.main([*args, "--out-dir", str(tmp_path / "a"), "--disambiguation", "global"])
    gc.main([*args, "--out-dir", str(tmp_path / "b"), "--disambiguation", "global"])
    assert (tmp_path / "a" / "codes.json").read_bytes() == (tmp_path / "b" / "codes.json").read_bytes()
    codes = load_codes(tmp_path / "a")
    assert codes.code_len == 2 and codes.disambiguation and codes.disambiguation_size == stats["largest_group"] > 1
    all_codes = [codes.code(i) for i in codes.image_ids()]
    assert len(set(all_codes)) == 60 and stats["final_collision_rate"] == 0.0
    assert stats["raw_collision_rate"] == pytest.approx(1 - len({c[:1] for c in all_codes}) / 60)
    assert set(codes.image_ids("test")) == {f"im{i:03d}" for i in range(40, 60)}
    assert stats["splits"]["train"]["num_images"] == 40 and stats["code_len"] == 2
    assert codes.position_size(0) == 2 and codes.position_size(1) == codes.disambiguation_size
    book = load_codebook(tmp_path / "a", codes)
    assert book.shape == (1, 2, 3) and book.dtype == np.float32
    np.testing.assert_array_equal(book, RQVAE.from_pretrained(rq).codebooks.detach().numpy())

    kept = gc.main([*args, "--out-dir", str(tmp_path / "raw")])  # the default: raw codes
    raw = load_codes(tmp_path / "raw")
    assert raw.code_len == 1 and not raw.disambiguation and kept["disambiguation_mode"] == "none"
    assert kept["final_collision_rate"] == kept["raw_collision_rate"] == stats["raw_collision_rate"] > 0
    assert [raw.code(i) for i in raw.image_ids()] == [c[:1] for c in all_codes]


def test_load_codes_validates(tmp_path):
    emb = make_emb(tmp_path / "emb")
    gc.main(["--rqvae-dir", str(tiny_rqvae(tmp_path)), "--emb-dir", str(emb), "--out-dir", str(tmp_path / "c"), "--device", "cpu",
             "--disambiguation", "global"])
    path = tmp_path / "c" / "codes.json"
    good = json.loads(path.read_text())
    for bad_code, msg in (([5, 0], "position 0"), ([0], "list of 2"), ([0, 99], "position 1")):
        bad = json.loads(json.dumps(good))
        bad["images"]["im007"]["code"] = bad_code
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=f"codes.json: image 'im007'.*{msg}"):
            load_codes(tmp_path / "c")


def test_bad_input_leaves_no_output(tmp_path):
    emb = make_emb(tmp_path / "emb", dim=6)
    with pytest.raises(InputError, match="dim 6"):
        gc.main(["--rqvae-dir", str(tiny_rqvae(tmp_path)), "--emb-dir", str(emb), "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()


def test_train_then_generate_codes_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rng = np.random.default_rng(0)
    n, dim = 300, 24
    centers = rng.normal(size=(10, dim))
    img = centers[rng.integers(10, size=n)] + 0.4 * rng.normal(size=(n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    split = lambda i: "train" if i < 240 else ("val" if i < 270 else "test")  # noqa: E731
    images = [{"image_id": f"{i}", "file": f"{i}.jpg", "split": split(i)} for i in range(n)]
    captions, txt = [], []
    for i in range(n):
        for c in range(2):
            v = img[i] + 0.3 * rng.normal(size=dim)
            txt.append(v / np.linalg.norm(v))
            captions.append({"text": f"{c}", "image_row": i, "split": images[i]["split"]})
    emb = save_emb(tmp_path / "emb", img.astype(np.float16), np.asarray(txt, np.float16), images, captions,
                   {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": True})
    final = train_mod.main(["--emb-dir", str(emb), "--out-dir", str(tmp_path / "rqvae"), "--epochs", "3", "--batch-size", "64",
                            "--num-levels", "3", "--codebook-size", "32", "--latent-dim", "8", "--hidden-dims", "32", "--lr", "2e-3"])
    for f in ("model.safetensors", "config.json", "train.log", "metrics.jsonl", "final_metrics.json", "checkpoints/last/train_state.json"):
        assert (tmp_path / "rqvae" / f).is_file(), f
    stats = gc.main(["--rqvae-dir", str(tmp_path / "rqvae"), "--emb-dir", str(emb), "--out-dir", str(tmp_path / "codes"), "--device", "cpu"])
    codes = load_codes(tmp_path / "codes")
    assert len(codes.images) == 300 and codes.num_levels == 3 and codes.codebook_size == 32 and codes.shared_codebook
    assert codes.encoder["backend"] == "synthetic" and not codes.disambiguation
    assert 1 - len(set(codes.code(i) for i in codes.image_ids())) / 300 == pytest.approx(stats["raw_collision_rate"])
    # the tokenizer's retrieval ceiling on the held-out splits, next to the raw features
    assert set(stats["ceiling"]) == {"val", "test"}
    assert stats["ceiling"]["test"]["image_features"]["gallery_size"] == 30
    assert 0 <= stats["ceiling"]["test"]["decoded_codes"]["R@1"] <= stats["ceiling"]["test"]["decoded_codes"]["R@20"] <= 100
    assert stats["splits"]["train"]["collision_rate"] == pytest.approx(final["codes/collision_rate"])
    assert stats["raw_collision_rate"] < 1 - 20 / 300  # more distinct raw codes than the 10 clusters
    assert json.loads((tmp_path / "codes" / "stats.json").read_text())["num_images"] == 300
