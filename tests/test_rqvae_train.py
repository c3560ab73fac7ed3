"""k-means, dead codes, the feature sampler and the training entry point (resume bit for bit)."""
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avg.artifacts.emb import load_emb, save_emb
from avg.models.kmeans import DeadCodeTracker, init_codebooks, kmeans
from avg.models.rqvae import RQVAE, RQVAEConfig
from avg.stages import train_rqvae as train_mod
from avg.rqvae.data import FeatureBatchSampler, FeatureDataset, training_rows
from avg.core.io import InputError


def make_emb(out, n=120, dim=16, caps=3, clusters=6, seed=0):
    """Clustered unit image vectors; captions are noisy copies; 80% train, rest val/test."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    img = centers[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    split = lambda i: "train" if i < 0.8 * n else ("val" if i % 2 else "test")  # noqa: E731
    images = [{"image_id": f"img{i:04d}", "file": f"{i}.jpg", "split": split(i)} for i in range(n)]
    txt, captions = [], []
    for i in range(n):
        for c in range(caps):
            v = img[i] + 0.2 * rng.normal(size=dim)
            txt.append(v / np.linalg.norm(v))
            captions.append({"text": f"caption {c} of {i}", "image_row": i, "split": images[i]["split"]})
    enc = {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": True}
    return save_emb(out, img.astype(np.float16), np.asarray(txt, np.float16), images, captions, enc)


# -- k-means ----------------------------------------------------------------------------
def numpy_lloyd(x, c, iters):
    x, c = x.astype(np.float64), c.astype(np.float64).copy()
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        for k in range(len(c)):
            if (labels == k).any():  # an empty cluster keeps its centroid
                c[k] = x[labels == k].mean(0)
    labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c, labels


def test_kmeans_matches_numpy_lloyd():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(loc=m, size=(20, 3)) for m in (-4, 0, 4)]).astype(np.float32)
    init = x[[0, 1, 2, 40]]  # a poor start, so Lloyd has work to do
    ref_c, ref_labels = numpy_lloyd(x, init, iters=15)
    res = kmeans(torch.from_numpy(x), 4, iters=15, init_centroids=torch.from_numpy(init), batch_size=7)
    np.testing.assert_allclose(res.centroids.numpy(), ref_c, rtol=1e-5, atol=1e-5)
    assert np.array_equal(res.labels.numpy(), ref_labels)
    assert res.inertia == pytest.approx(((x - ref_c[ref_labels]) ** 2).sum(), rel=1e-4)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_is_seeded(init):
    x = torch.randn(200, 4)
    a, b = kmeans(x, 8, init=init, seed=3), kmeans(x, 8, init=init, seed=3)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, kmeans(x, 8, init=init, seed=4).centroids)
    assert len(a.labels.unique()) == 8


def test_kmeans_with_fewer_points_than_k():
    x = torch.randn(3, 4)
    res = kmeans(x, 5)
    assert res.centroids.shape == (5, 4) and torch.equal(res.centroids[:3], x)


@pytest.mark.parametrize("shared", [False, True])
def test_init_codebooks_fits_the_residuals(shared):
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=8, hidden_dims=[8], latent_dim=4, num_levels=2, codebook_size=6, shared_codebook=shared))
    x = torch.randn(300, 8)
    init_codebooks(model, x, seed=0)
    z = model.encoder(x).detach()
    ref = kmeans(z, 6 if not shared else 3, seed=0)  # level 1 (per-level book or first slice)
    torch.testing.assert_close(model.codebooks[0, : len(ref.centroids)], ref.centroids)
    counts = torch.bincount(model.encode(x).flatten(), minlength=6)
    assert (counts > 0).sum() >= 5  # k-means init puts the vokens to use


def test_dead_codes_are_reset_to_current_residuals():
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=8, hidden_dims=[8], latent_dim=4, num_levels=2, codebook_size=6, shared_codebook=False))
    before = model.codebooks.detach().clone()
    tracker = DeadCodeTracker(2, 6, 2, threshold=3, seed=0)
    codes = torch.tensor([[0, 1], [1, 1], [0, 2]])
    residuals = torch.randn(3, 2, 4)
    for _ in range(2):
        tracker.update(codes)
        assert tracker.reset(model, residuals) == 0
    tracker.update(codes)
    assert tracker.reset(model, residuals) == 4 + 4  # level 0: codes 2..5 dead, level 1: 0, 3, 4, 5
    after = model.codebooks.detach()
    assert torch.equal(after[0, :2], before[0, :2]) and torch.equal(after[1, 1:3], before[1, 1:3])
    for level, rows in ((0, [2, 3, 4, 5]), (1, [0, 3, 4, 5])):
        for k in rows:  # every reset entry is one of that level's current residuals
            assert any(torch.equal(after[level, k], residuals[i, level]) for i in range(3))
    assert tracker.total_reset == 8 and not tracker.dead_mask().any()


# -- data -------------------------------------------------------------------------------
def test_sampler_uses_training_captions_only_and_is_seeded(tmp_path):
    emb_dir = make_emb(tmp_path / "emb")
    emb = load_emb(emb_dir)
    emb.index["captions"][0]["split"] = "test"  # a mislabelled caption of a train image
    rows, caps = training_rows(emb, ["train"])
    assert len(rows) == 96 and all(emb.images[r]["split"] == "train" for r in rows)
    assert 0 not in caps.flat and len(caps) == len(rows)
    s = FeatureBatchSampler(rows, caps, 32, seed=5)
    epoch0 = [p for b in s for p in b]
    assert sorted(r for r, _ in epoch0) == sorted(rows.tolist())
    for r, c in epoch0:  # ONE caption per image, a caption of that image, from training
        assert emb.captions[c]["image_row"] == r and emb.captions[c]["split"] == "train"
    assert epoch0 == [p for b in FeatureBatchSampler(rows, caps, 32, seed=5) for p in b]
    s.set_epoch(1)
    assert epoch0 != [p for b in s for p in b]
    ds = FeatureDataset(emb.image_features, emb.text_features)
    blob = pickle.dumps(ds)  # spawned workers get file names, not the feature arrays
    assert len(blob) < 2000 and isinstance(pickle.loads(blob).image_features, np.memmap)
    batch = ds.__getitems__(epoch0[:5] + [(rows[0], -1)])
    assert batch["image"].dtype == torch.float32 and batch["text_mask"].tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(batch["image"][1].numpy(), emb.image_features[epoch0[1][0]].astype(np.float32))
    with pytest.raises(InputError, match="no images in split"):
        training_rows(emb, ["nosuchsplit"])


# -- training entry point ---------------------------------------------------------------
FLAGS = ["--batch-size", "32", "--num-levels", "2", "--codebook-size", "16", "--latent-dim", "4", "--hidden-dims", "16",
         "--lr", "3e-3", "--dead-code-threshold", "2", "--warmup-steps", "2", "--kmeans-samples", "64", "--seed", "7"]


def run_train(emb_dir, out_dir, *extra):
    return train_mod.main(["--emb-dir", str(emb_dir), "--out-dir", str(out_dir), *FLAGS, *extra])


def test_resume_is_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    emb_dir = make_emb(tmp_path / "emb")
    flags = ["--epochs", "2", "--dead-code-threshold", "1"]  # resets in both epochs
    run_train(emb_dir, tmp_path / "straight", *flags)
    run_train(emb_dir, tmp_path / "resumed", *flags, "--stop-after-epochs", "1")
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    ckpt = json.loads((tmp_path / "resumed" / "checkpoints" / "last" / "train_state.json").read_text())
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3
    run_train(emb_dir, tmp_path / "resumed", *flags, "--resume")
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = lambda d: {k: v for k, v in json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]).items() if k != "time"}  # noqa: E731
    assert last(tmp_path / "straight") == last(tmp_path / "resumed")
    assert last(tmp_path / "straight")["epoch"] == 2
    resets = [json.loads(x).get("train/dead_codes_reset", 0) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert resets[-2] > 0 and resets[-1] > 0  # so the resumed run must restore the dead-code state
    with pytest.raises(InputError, match="differs"):
        run_train(emb_dir, tmp_path / "resumed", "--epochs", "3", "--resume", "--codebook-size", "32")
    # a damaged checkpoint state: an error naming the file, not a traceback
    path = tmp_path / "resumed" / "checkpoints" / "last" / "train_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dead_code": {"unused": [[0]]}}))
    with pytest.raises(InputError, match=r"train_state\.json: unreadable dead-code state"):
        run_train(emb_dir, tmp_path / "resumed", *flags, "--resume")


def test_mid_epoch_resume_is_bit_for_bit_and_epochs_are_kept(tmp_path, monkeypatch):
    """On the shared loop the RQ-VAE also stops mid-epoch (--stop-after-steps 2 of 3 a epoch: the
    checkpoint holds the sampler position, the dead-code counters and generator, every RNG) and the
    same command continues to the weights of an uninterrupted run; --keep-every-epochs keeps copies."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    emb_dir = make_emb(tmp_path / "emb")
    flags = ["--epochs", "2", "--dead-code-threshold", "1", "--dropout", "0.1"]  # resets and dropout draws
    run_train(emb_dir, tmp_path / "straight", *flags)
    run_train(emb_dir, tmp_path / "resumed", *flags, "--stop-after-steps", "2", "--keep-every-epochs", "1")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "last" / "train_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    assert state["dead_code"]["total_reset"] > 0 and not (tmp_path / "resumed" / "model.safetensors").exists()
    # stopped again after the epoch's last step, before the epoch closes: nothing of it is left to run
    run_train(emb_dir, tmp_path / "resumed", *flags, "--stop-after-steps", "1", "--keep-every-epochs", "1")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "last" / "train_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    run_train(emb_dir, tmp_path / "resumed", *flags, "--keep-every-epochs", "1")  # the same command, no --resume
    assert "resuming from" in (tmp_path / "resumed" / "train.log").read_text()
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the per-epoch means cover whole epochs, across the interruptions: the same log lines and final metrics
    epochs = lambda d: [{k: v for k, v in json.loads(x).items() if k != "time"}  # noqa: E731
                        for x in (d / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    assert len(epochs(tmp_path / "straight")) == 2 and epochs(tmp_path / "straight") == epochs(tmp_path / "resumed")
    final = lambda d: json.loads((d / "final_metrics.json").read_text())  # noqa: E731
    assert final(tmp_path / "straight") == final(tmp_path / "resumed") and "train/total" in final(tmp_path / "resumed")
    kept = sorted(d.name for d in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["epoch_0001", "epoch_0002", "last"]
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "epoch_0001" / "train_state.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shards_full_batches_over_processes_and_skips(drop_last):
    """rank r of W takes every W-th batch of the epoch's list; every rank gets the same number of
    full batches (so gathered codes have one shape), together covering every image; one process is
    the plain list; skip_batches drops the batches a resumed run already saw."""
    rows, caps = np.arange(100, 150), [[i] for i in range(50)]
    one = FeatureBatchSampler(rows, caps, 8, seed=2, drop_last=drop_last)
    plain = [b for b in one]
    assert len(plain) == len(one) == (6 if drop_last else 7) and one.batches_per_epoch() == len(one)
    shards = []
    for rank in range(3):
        s = FeatureBatchSampler(rows, caps, 8, seed=2, drop_last=drop_last, rank=rank, world_size=3)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == s.batches_per_epoch() == (2 if drop_last else 3)
        assert all(len(b) == 8 for b in shards[-1])
    assert shards[0][0] == plain[0] and shards[1][0] == plain[1] and shards[2][0] == plain[2]
    seen = {r for shard in shards for b in shard for r, _ in b}
    assert seen == set(rows.tolist()) if not drop_last else seen <= set(rows.tolist())
    one.set_epoch(0, skip_batches=2)
    assert list(one) == plain[2:] and len(one) == len(plain) - 2
    with pytest.raises(ValueError, match="rank"):
        FeatureBatchSampler(rows, caps, 8, rank=3, world_size=3)


def test_dead_code_state_round_trips_through_json():
    tracker = DeadCodeTracker(2, 6, 2, threshold=3, seed=4)
    tracker.update(torch.tensor([[0, 1], [2, 1]]))
    tracker.reset(RQVAE(RQVAEConfig(input_dim=4, hidden_dims=[4], latent_dim=4, num_levels=2, codebook_size=6,
                                    shared_codebook=False)), torch.randn(2, 2, 4))
    copy = DeadCodeTracker(2, 6, 2, threshold=3, seed=0)
    copy.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert torch.equal(copy.unused, tracker.unused) and copy.total_reset == tracker.total_reset
    assert torch.equal(torch.randint(100, (5,), generator=copy.generator), torch.randint(100, (5,), generator=tracker.generator))
    with pytest.raises(ValueError, match="shape"):
        DeadCodeTracker(1, 6, 2, threshold=3).load_state_dict(tracker.state_dict())


def test_training_logs_every_term_and_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    emb_dir = make_emb(tmp_path / "emb")
    final = run_train(emb_dir, tmp_path / "run", "--epochs", "4", "--per-level-codebooks", "--align-weight", "0.5")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch" in r]
    assert len(epochs) == 4
    for key in ("train/recon", "train/commit", "train/codebook", "train/align", "train/total", "train/dead_codes_reset",
                "codes/collision_rate", "codes/usage_l1", "codes/perplexity_l2", "eval/val/recon"):
        assert key in epochs[-1], key
    assert epochs[-1]["train/total"] < epochs[0]["train/total"]
    assert final["codes/collision_rate"] == epochs[-1]["codes/collision_rate"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["shared_codebook"] is False and cfg["align_weight"] == 0.5
    assert (tmp_path / "run" / "train.log").read_text().count("train/total") == 4
    run_train(emb_dir, tmp_path / "fresh", "--resume")  # nothing to resume: every trainer starts fresh, and says so
    assert "--resume: no checkpoint at" in (tmp_path / "fresh" / "train.log").read_text()


def test_training_repeats_bit_for_bit_at_demo_shapes(tmp_path, monkeypatch):
    """Same seed, same features -> the same weights, at shapes where the CPU kernels run in parallel
    (batch 512, latent 64, codebook 256): the codebook's gradient is a scatter-add over the batch, whose
    float sums depend on thread timing unless deterministic kernels are on (they are, on the CPU)."""
    from avg.stages import train_rqvae as train_mod

    monkeypatch.setenv("WANDB_MODE", "disabled")
    make_emb(tmp_path / "emb", n=2560, dim=128, caps=1, clusters=40)
    before = torch.are_deterministic_algorithms_enabled()
    weights = []
    for run in ("a", "b"):
        train_mod.main(["--emb-dir", str(tmp_path / "emb"), "--out-dir", str(tmp_path / run), "--epochs", "2",
                        "--batch-size", "512", "--latent-dim", "64", "--codebook-size", "256", "--num-levels", "4",
                        "--kmeans-samples", "1024", "--kmeans-iters", "3", "--seed", "3"])
        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
    assert torch.are_deterministic_algorithms_enabled() == before  # the trainer leaves the global switch as it was
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

