"""Codes for 1,000,000 x 768 float16 features without ever holding a float32 copy.

A float32 copy of the array would need ~3 GB; the encoder must stream it from the memmap. The
work runs in a subprocess that samples its own RssAnon (anonymous, i.e. not file-backed, memory)
from /proc/self/status in a thread, so pages of the memmap (file-backed) do not count but any
copy of the data would.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

N_ROWS, DIM = 1_000_000, 768
LIMIT_MB = 600

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np, torch

    def rss_anon_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    peak = [0.0]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.01)

    from avg.models.rqvae import RQVAE, RQVAEConfig
    from avg.rqvae.data import CaptionRows, FeatureBatchSampler, FeatureDataset
    from avg.artifacts.codes import collision_stats
    from avg.stages.generate_codes import encode_features

    torch.set_num_threads(2)
    torch.manual_seed(0)
    feats = np.load(sys.argv[1], mmap_mode="r")
    model = RQVAE(RQVAEConfig(input_dim=feats.shape[1], hidden_dims=[32], latent_dim=8, num_levels=2, codebook_size=16))
    base = rss_anon_mb()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.time()
    codes, errors = encode_features(model, feats, batch_size=16384, progress=False)
    encode_s = time.time() - t0
    # the training data path too: shuffled batches gathered from the same memmap
    rows = np.arange(feats.shape[0])
    sampler = FeatureBatchSampler(rows, CaptionRows(np.arange(len(rows) + 1), rows), 4096, seed=0)  # caption j = row j
    ds = FeatureDataset(feats, feats)
    for i, batch in enumerate(sampler):
        x = ds.__getitems__(batch)["image"]
        assert x.dtype == torch.float32 and x.shape == (4096, feats.shape[1])
        if i == 20:
            break
    stop.set()
    t.join()
    stats = collision_stats(codes, 16)
    print(json.dumps({"peak_mb": peak[0], "base_mb": base, "rows": int(codes.shape[0]), "encode_s": encode_s,
                      "finite": bool(np.isfinite(errors).all()), "usage_l1": stats["levels"][0]["usage"]}))
    """
)


@pytest.mark.slow
def test_codes_for_a_million_rows_stay_memory_mapped(tmp_path):
    path = tmp_path / "image_features.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(N_ROWS, DIM))
    rng = np.random.default_rng(0)
    chunk = 100_000
    for s in range(0, N_ROWS, chunk):  # written in chunks: the test itself never holds it all
        arr[s : s + chunk] = rng.random((min(chunk, N_ROWS - s), DIM), dtype=np.float32) - 0.5
    arr.flush()
    del arr
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        path.unlink()  # 1.5 GB: do not leave it to pytest's tmp retention
    print(result)
    assert result["rows"] == N_ROWS and result["finite"] and result["usage_l1"] > 0
    assert result["peak_mb"] < LIMIT_MB, f"peak anonymous memory {result['peak_mb']:.0f} MB (float32 copy would be ~2930 MB)"
