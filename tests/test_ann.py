"""ANN baselines of the efficiency benchmark (avg.experiments.ann) and the recall-throughput curves."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is part of the dev extra")

from avg.experiments import efficiency as eff, scaling, systems as S, timing  # noqa: E402
from avg.experiments.plots import plot_curves  # noqa: E402
from avg.experiments.ann import build_ann, default_nlist, exact_topk, pareto_front  # noqa: E402
from avg.core.io import InputError  # noqa: E402


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_ivf_visiting_every_list_is_exact_search(kind):
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 600, 32), _unit(rng, 20, 32)
    ann = build_ann(x, kind, nlist=8)
    assert ann.params["nlist"] == 8 and ann.knob_values() == [1, 2, 4, 8]
    ann.set_knob(8)
    scores, rows = ann.search(q, 10)
    ref = exact_topk(x, q, 10)
    if kind == "ivf_flat":
        assert (rows == ref).all()  # nprobe = nlist scans every vector exactly
    else:  # every list scanned: exact search over the vectors as PQ reconstructs them
        import faiss

        faiss.extract_index_ivf(ann.index).make_direct_map()
        decoded = np.stack([ann.index.reconstruct(i) for i in range(len(x))])
        best = -np.sort(-(q @ decoded.T), axis=1)[:, :10]
        assert np.allclose(scores, best, atol=1e-4)  # (PQ decodes many vectors alike: compare scores, not tied ids)
    ann.set_knob(1)
    _, few = ann.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(few, ref)]) <= np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(rows, ref)])
    assert ann.nbytes > 0


def test_hnsw_with_a_wide_search_finds_the_exact_neighbours_and_sizes_are_sane():
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 300, 16), _unit(rng, 10, 16)
    ann = build_ann(x, "hnsw", hnsw_m=8)
    ann.set_knob(300)
    _, rows = ann.search(q, 5)
    assert (rows == exact_topk(x, q, 5)).all()
    assert default_nlist(1_000_000) == 4000 and default_nlist(1000) == 25 and default_nlist(10) == 1
    flat = build_ann(x, "ivf_flat", nlist=4)
    pq = build_ann(x, "ivf_pq", nlist=4, pq_bytes=4)
    assert pq.nbytes < flat.nbytes  # codes of a few bytes against 64-byte vectors
    with pytest.raises(InputError, match="unknown ANN index"):
        build_ann(x, "lsh")


def test_pareto_front():
    pts = [(10, 50), (100, 40), (50, 50), (5, 60), (100, 30)]
    assert pareto_front(pts) == [False, True, True, True, False]


class _Enc:
    def __init__(self, feats):
        self.feats = feats

    def encode_texts(self, texts):  # query i is image i's feature: gold at rank 1 for an exact search
        return torch.from_numpy(self.feats[[int(t.split()[-1]) for t in texts]])


def test_ann_system_and_curves_in_the_benchmark(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(2)
    n, d = 400, 16
    feats = _unit(rng, n, d)
    ids = [f"img{i}" for i in range(n)]
    codes = rng.integers(0, 12, size=(n, 3))  # room for new synthetic codes
    enc = _Enc(feats)
    cpu = torch.device("cpu")
    systems = [S.TwoTowerSystem(enc, cpu, k=10), S.AnnSystem(enc, cpu, "ivf_flat", k=10, nlist=8),
               S.AnnSystem(enc, cpu, "hnsw", k=10, sweep=[4, 64])]
    queries = [{"query": f"image {i}", "gold": ids[i]} for i in range(0, n, 40)]
    real = {"image_ids": ids, "features": feats, "codes": codes, "first": n}
    rows = timing.benchmark(systems, real, queries, [n], batch_size=5, max_seconds=5, warmup=0, noise_std=0.1, seed=0,
                         device=cpu, progress=False, curves=True, curve_max_seconds=5)
    df = pd.DataFrame(rows)
    batch = df[df["mode"] == "batch"]
    assert sorted(batch[batch.system == "ivf_flat"]["knob_value"]) == [1, 2, 4, 8]
    assert sorted(batch[batch.system == "hnsw"]["knob_value"]) == [4, 64]
    assert (df[df.system == "clip_fp32"]["R@1"] == 100.0).all()
    full = batch[(batch.system == "ivf_flat") & (batch.knob_value == 8)]
    assert float(full["R@1"].iloc[0]) == 100.0 and float(full["exact_R@10"].iloc[0]) == 100.0  # every list visited: exact
    assert (df[df.system == "clip_fp32"]["exact_R@10"] == 100.0).all()
    assert (df["curve_recall"] == df["R@10"]).all()  # a gallery of real images: the curves plot gold R@10
    synthetic = timing.benchmark(systems[:2], real, queries, [n + 200], batch_size=5, max_seconds=5, warmup=0, noise_std=0.1,
                              seed=0, device=cpu, progress=False, curves=True, curve_max_seconds=5)
    assert all(r["curve_recall"] == r["exact_R@10"] for r in synthetic)  # beyond the real images: agreement with exact
    rows_avg = [{**synthetic[0], "system": "avg", "curve_recall": 1.0}]
    timing.add_curve_recall(rows_avg, [[["img0"]] * len(queries)])
    assert rows_avg[0]["curve_recall"] is None  # a generative system's recall is not comparable on synthetic codes
    png = plot_curves(pd.DataFrame(synthetic + [{**rows_avg[0], "mode": "batch", "knob_value": 10}]), tmp_path / "s.png")
    assert png is not None
    assert batch["pareto"].isin([True, False]).all() and batch["pareto"].any()
    assert len(df[df["mode"] == "batch1"]) == 3 and df[df["mode"] == "batch1"]["default_knob"].all()
    png = plot_curves(df, tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000
    scale = scaling.scale_rows(rows, d)
    by = {r["system"]: r for r in scale}
    assert by["clip_fp32"]["bytes_per_image"] == pytest.approx(4 * d)
    assert by["clip_fp32"]["GB_at_1e9"] == pytest.approx(4 * d * 1e9 / 2**30, rel=1e-3)
    assert by["clip_fp32"]["exact_macs_per_query_at_1e9"] == d * 10**9 and by["hnsw"]["extrapolated"]
    assert eff.parse_sweep(["hnsw=16,64", "avg=10"]) == {"hnsw": [16, 64], "avg": [10]}
    with pytest.raises(InputError, match="--sweep"):
        eff.parse_sweep(["hnsw=a"])
