"""prepare_emb end to end on the tiny demo set: open_clip (custom config + checkpoint file) and HF backends."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from avg.artifacts.emb import load_emb
from avg.data.karpathy import load_karpathy
from avg.stages.prepare_emb import main as prepare_emb
from avg.core.io import InputError


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """A randomly initialised avg-demo-vit saved the way the demo CLIP is saved."""
    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    register_clip_configs()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    return save_open_clip_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "demo.pt", extra={"model": "avg-demo-vit"})


def _args(data, out, *extra):
    return ["--annotations", str(data.json_path), "--image-root", str(data.image_root), "--out-dir", str(out), "--no-progress", "--batch-size", "16", *extra]


def test_open_clip_custom_config_checkpoint(tiny_demo, demo_ckpt, tmp_path):
    from avg.data.images import load_rgb
    from avg.models.clip import load_clip

    out = prepare_emb(_args(tiny_demo, tmp_path / "emb", "--backend", "open_clip", "--clip-model", "avg-demo-vit", "--pretrained", str(demo_ckpt), "--num-workers", "1"))
    emb = load_emb(out)
    ds = load_karpathy(tiny_demo.json_path, tiny_demo.image_root)
    assert emb.image_features.shape == (40, 128) and emb.text_features.shape == (200, 128)
    assert emb.image_features.dtype == np.float16 and emb.text_features.dtype == np.float16
    enc = emb.index["encoder"]
    assert enc["backend"] == "open_clip" and enc["model"] == "avg-demo-vit" and enc["pretrained"] == str(demo_ckpt)
    assert enc["normalized"] is True and enc["dim"] == 128 and emb.normalized
    for feats in (emb.image_features, emb.text_features):
        np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert emb.index["skipped_images"] == []
    assert {s: len(emb.image_rows(s)) for s in ("train", "val", "test")} == {"train": 24, "val": 8, "test": 8}
    # captions point at the image they describe; rows follow the json's order
    assert [im["image_id"] for im in emb.images] == [r.image_id for r in ds.images]
    for c in emb.captions:
        rec = ds.images[c["image_row"]]
        assert c["text"] in rec.captions and c["split"] == rec.split
    # the stored rows are the checkpoint's features, not some other model's
    clip = load_clip("open_clip", "avg-demo-vit", str(demo_ckpt), device="cpu")
    row = 17
    direct = clip.encode_images(clip.preprocess(load_rgb(ds.images[row].path))[None])[0].numpy()
    np.testing.assert_allclose(emb.image_features[row].astype(np.float32), direct, atol=3e-3)
    j = emb.caption_rows("test")[3]
    direct_t = clip.encode_texts([emb.captions[j]["text"]])[0].numpy()
    np.testing.assert_allclose(emb.text_features[j].astype(np.float32), direct_t, atol=3e-3)
    # a different seed of the same architecture gives different features: the file was loaded
    other = load_clip("open_clip", "avg-demo-vit", None, device="cpu")
    assert not np.allclose(other.encode_texts([emb.captions[j]["text"]])[0].numpy(), direct_t, atol=1e-2)


def test_no_normalize_and_max_images(tiny_demo, demo_ckpt, tmp_path):
    out = prepare_emb(_args(tiny_demo, tmp_path / "emb", "--clip-model", "avg-demo-vit", "--pretrained", str(demo_ckpt), "--num-workers", "0", "--no-normalize", "--max-images", "6"))
    emb = load_emb(out)
    assert emb.image_features.shape == (6, 128) and emb.text_features.shape == (30, 128)
    assert emb.index["encoder"]["normalized"] is False and not emb.normalized
    assert not np.allclose(np.linalg.norm(emb.image_features.astype(np.float32), axis=1), 1.0, atol=1e-2)


def _tiny_hf_clip(path):
    """A tiny transformers CLIP with the real CLIP BPE (taken from open_clip's bundled vocab)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=24,
    )
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    specials = dict(bos_token="<start_of_text>", eos_token="<end_of_text>", pad_token="<end_of_text>", unk_token="<end_of_text>")
    tok = CLIPTokenizer(vocab=dict(bpe.encoder), merges=merges, **specials)
    assert len(tok) == 49408 and tok("a big red star")["input_ids"] == [49406, *bpe.encode("a big red star"), 49407]
    tok.save_pretrained(path)
    return path


def test_hf_backend_local_dir(tiny_demo, tmp_path):
    model_dir = _tiny_hf_clip(tmp_path / "tiny-clip")
    out = prepare_emb(_args(tiny_demo, tmp_path / "emb", "--backend", "hf", "--clip-model", str(model_dir), "--num-workers", "0", "--max-images", "12"))
    emb = load_emb(out)
    assert emb.image_features.shape == (12, 24) and emb.text_features.shape == (60, 24)
    assert emb.index["encoder"]["backend"] == "hf" and emb.index["encoder"]["model"] == str(model_dir)
    assert emb.normalized
    np.testing.assert_allclose(np.linalg.norm(emb.text_features.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # different captions get different features (the tokenizer is wired in, not all padding)
    assert np.abs(emb.text_features[0].astype(np.float32) - emb.text_features[1].astype(np.float32)).max() > 1e-3


def test_bad_image_fails_cleanly_or_is_skipped(tiny_demo, demo_ckpt, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_demo.out_dir, data_dir)
    ds = load_karpathy(data_dir / tiny_demo.json_path.name, data_dir / "images")
    bad, missing = ds.images[3], ds.images[30]
    raw = bad.path.read_bytes()
    bad.path.write_bytes(raw[: len(raw) // 3])          # truncated PNG
    data = tiny_demo._replace(json_path=data_dir / tiny_demo.json_path.name, image_root=data_dir / "images")
    common = ["--clip-model", "avg-demo-vit", "--pretrained", str(demo_ckpt), "--num-workers", "0"]

    with pytest.raises(InputError, match=bad.path.name):
        prepare_emb(_args(data, tmp_path / "emb", *common))
    assert not (tmp_path / "emb").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".emb")] == []

    missing.path.unlink()
    out = prepare_emb(_args(data, tmp_path / "emb", *common, "--skip-bad-images"))
    emb = load_emb(out)
    assert emb.image_features.shape[0] == 38 and emb.text_features.shape[0] == 190
    skipped = {s["image_id"]: s for s in emb.index["skipped_images"]}
    assert set(skipped) == {bad.image_id, missing.image_id}
    assert "cannot decode" in skipped[bad.image_id]["error"] and "not found" in skipped[missing.image_id]["error"]
    kept_ids = [im["image_id"] for im in emb.images]
    assert bad.image_id not in kept_ids and missing.image_id not in kept_ids
    texts = {c["text"] for c in emb.captions}
    assert not texts & (set(bad.captions) - {c for r in ds.images if r is not bad for c in r.captions})
    for c in emb.captions:                               # rows were renumbered consistently
        assert c["text"] in ds.images[[r.image_id for r in ds.images].index(kept_ids[c["image_row"]])].captions


def test_openai_tags_get_quick_gelu_and_bad_pretrained_is_named(demo_ckpt):
    from avg.models.clip import _tag_needs_quick_gelu, load_clip

    # open_clip 3.x only warns when ViT-L-14-336 meets the QuickGELU-trained openai weights
    assert _tag_needs_quick_gelu("ViT-L-14-336", "openai") is True
    assert _tag_needs_quick_gelu("ViT-L-14-336-quickgelu", "openai") is False
    assert _tag_needs_quick_gelu("avg-demo-vit", str(demo_ckpt)) is False
    with pytest.raises(InputError, match="no_such_file.pt"):
        load_clip("open_clip", "avg-demo-vit", "/nonexistent/no_such_file.pt", device="cpu")
    with pytest.raises(InputError, match="not-a-model"):
        load_clip("open_clip", "not-a-model", None, device="cpu")


def test_make_demo_assets_tiny_then_cached(tmp_path):
    """The demo asset builder trains, saves a loadable checkpoint, scores it, then reuses it."""
    import json
    from pathlib import Path

    from conftest import load_tool

    mod = load_tool("make_demo_assets")
    argv = ["--data-dir", str(tmp_path / "demo"), "--n-train", "24", "--n-val", "4", "--n-test", "8", "--epochs", "2", "--batch-size", "8", "--no-progress"]
    out = mod.main(argv)
    ckpt = Path(out["clip_checkpoint"])
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    assert metrics["num_queries"] == 40 and metrics["gallery_size"] == 8 and metrics["train"]["steps"] == 6
    assert (ckpt.parent / "run_test.jsonl").is_file()
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)     # plain tensors + json-able extras
    assert "state_dict" in payload and payload["model"] == "avg-demo-vit"
    stamp = ckpt.stat().st_mtime_ns
    again = mod.main(argv)
    assert ckpt.stat().st_mtime_ns == stamp and again["clip_metrics"]["R@1"] == metrics["R@1"]


def test_image_grid_is_the_pooled_patch_tokens_and_leaves_the_features_alone(tiny_demo, demo_ckpt, tmp_path):
    from avg.data.images import load_rgb
    from avg.models.clip import load_clip, pool_grid

    common = ("--clip-model", "avg-demo-vit", "--pretrained", str(demo_ckpt), "--num-workers", "0", "--max-images", "5")
    plain = load_emb(prepare_emb(_args(tiny_demo, tmp_path / "plain", *common)))
    gridded = load_emb(prepare_emb(_args(tiny_demo, tmp_path / "grid", *common, "--image-grid", "2")))
    assert plain.image_grid is None and gridded.image_grid.shape == (5, 4, 96) and gridded.image_grid.dtype == np.float16
    assert gridded.index["encoder"]["grid"] == 2 and gridded.index["encoder"]["grid_width"] == 96
    np.testing.assert_array_equal(gridded.image_features, plain.image_features)
    np.testing.assert_array_equal(gridded.text_features, plain.text_features)
    # row 3: the ViT's 8 x 8 patch tokens averaged over each 4 x 4 quarter, row-major from the top left
    clip = load_clip("open_clip", "avg-demo-vit", str(demo_ckpt), device="cpu")
    clip.model.visual.output_tokens = True
    _, tokens = clip.model.visual(clip.preprocess(load_rgb(tiny_demo.image_root / gridded.images[3]["file"]))[None])
    maps = tokens[0].view(8, 8, -1)
    quarters = [maps[r:r + 4, c:c + 4].mean((0, 1)) for r in (0, 4) for c in (0, 4)]
    np.testing.assert_allclose(gridded.image_grid[3].astype(np.float32), torch.stack(quarters).numpy(), atol=2e-2, rtol=1e-2)
    assert pool_grid(tokens, 16).shape == (1, 64, 96)  # a grid finer than the patches keeps them
    with pytest.raises(InputError, match="square"):
        pool_grid(torch.zeros(1, 6, 3), 2)


def test_image_grid_hf_backend_and_refusal_without_patch_tokens(tiny_demo, tmp_path):
    model_dir = _tiny_hf_clip(tmp_path / "tiny-clip")
    emb = load_emb(prepare_emb(_args(tiny_demo, tmp_path / "emb", "--backend", "hf", "--clip-model", str(model_dir),
                                     "--num-workers", "0", "--max-images", "3", "--image-grid", "2")))
    assert emb.image_grid.shape == (3, 4, 32)  # 32 px / patch 8 = 4 x 4 patches (class token dropped) -> 2 x 2
    plain = load_emb(prepare_emb(_args(tiny_demo, tmp_path / "plain", "--backend", "hf", "--clip-model", str(model_dir),
                                       "--num-workers", "0", "--max-images", "3")))
    np.testing.assert_array_equal(emb.image_features, plain.image_features)  # the same pooled features
    from avg.models.clip import ClipEncoder

    with pytest.raises(InputError, match="no patch tokens"):
        ClipEncoder("toy", None, device="cpu")._image_features_and_tokens(torch.zeros(1, 3, 4, 4))


def test_probe_tool_reports_each_fact_for_pooled_and_grid_features(tiny_demo, demo_ckpt, tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("probe_demo_features", "tools/probe_demo_features.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    emb = prepare_emb(_args(tiny_demo, tmp_path / "emb", "--clip-model", "avg-demo-vit", "--pretrained", str(demo_ckpt),
                            "--num-workers", "0", "--image-grid", "2"))
    out = probe.main(["--emb-dir", str(emb), "--annotations", str(tiny_demo.json_path), "--steps", "5"])
    assert list(out) == ["shape present", "colour present", "cell occupied", "background colour", "(shape, colour)", "(cell, colour)"]
    for row in out.values():
        assert set(row) == {"base_rate", "pooled feature", "patch grid (4 cells)"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert "| cell occupied |" in capsys.readouterr().out
    data = json.loads(tiny_demo.json_path.read_text())
    del data["images"][2]["scene"]
    bad = tmp_path / "noscene.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"no scene recorded for image .*images\[2\]"):
        probe.main(["--emb-dir", str(emb), "--annotations", str(bad), "--steps", "1"])
