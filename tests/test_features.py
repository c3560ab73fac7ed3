import numpy as np
import pytest

from avg.artifacts.emb import INDEX, load_emb, save_emb
from avg.core.io import InputError, read_json, write_json


def _write(tmp_path, n_img=4, caps_per=2, dim=8):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n_img, dim)).astype(np.float16)
    txt = rng.standard_normal((n_img * caps_per, dim)).astype(np.float16)
    images = [{"image_id": f"i{i}.png", "file": f"train/i{i}.png", "split": "train" if i < 2 else "test"} for i in range(n_img)]
    captions = [{"text": f"c{j}", "image_row": j // caps_per, "split": images[j // caps_per]["split"]} for j in range(n_img * caps_per)]
    out = save_emb(tmp_path / "emb", img, txt, images, captions, encoder={"backend": "open_clip", "model": "m", "pretrained": "p", "normalized": False})
    return out, img, txt


def test_round_trip_is_memory_mapped(tmp_path):
    out, img, txt = _write(tmp_path)
    emb = load_emb(out)
    assert isinstance(emb.image_features, np.memmap)
    np.testing.assert_array_equal(emb.image_features, img)
    assert emb.dim == 8 and emb.normalized is False
    assert list(emb.image_rows("test")) == [2, 3]
    assert list(emb.caption_rows("train")) == [0, 1, 2, 3]
    assert emb.captions_per_image() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert emb.index["encoder"]["dtype"] == "float16"


def test_row_count_mismatch_is_named(tmp_path):
    out, _, _ = _write(tmp_path)
    index = read_json(out / INDEX)
    index["images"].append({"image_id": "extra", "file": "x", "split": "train"})
    write_json(index, out / INDEX)
    with pytest.raises(InputError, match=r"image_features.npy: 4 rows but .*index.json lists 5 images"):
        load_emb(out)


def test_missing_dir_says_what_to_run(tmp_path):
    with pytest.raises(InputError, match="prepare_emb"):
        load_emb(tmp_path / "nope")
