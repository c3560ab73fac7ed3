"""End to end through the real bash stage scripts and config plumbing, on the tiny generated dataset.

Runs prepare_emb -> CLIP baseline -> train_rqvae -> generate_codes -> prepare_retriever_dataset ->
T5 stage 1 -> T5 stage 2 -> report with a throwaway config, so a broken script, a flag that no
longer exists or a contract mismatch between stages fails here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY_T5_FLAGS, stage_script_env
from conftest import run_checked as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tiny_demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    t5_dir = work / "t5"
    env = stage_script_env(
        tiny_demo, work, CODE_LEN=2, CODEBOOK_SIZE=8, RQ_EPOCHS=3, RQ_BATCH_SIZE=16,
        RQ_ARGS="--latent-dim 16 --hidden-dims 32 --kmeans-samples 24",
        RETRIEVER_MODEL=t5_dir, T5_EPOCHS=1, T5_BATCH_SIZE=16, BEAM=5,
        STAGE2_EPOCHS=1, STAGE2_MAX_TRAIN_QUERIES=32, DIS_BEAMS=3,
        T5_ARGS="--eval-train-queries 0 --eval-batch-size 8", RERANK_TOPK=5)
    _run([sys.executable, "tools/make_demo_t5.py", "--annotations", tiny_demo.json_path, "--out-dir", t5_dir,
          *TINY_T5_FLAGS], env)
    logs = {}
    for script in ("prepare_emb.sh", "eval_clip_baseline.sh", "train_rqvae.sh", "generate_codes.sh",
                   "prepare_retriever_dataset.sh", "train_retriever_t5.sh", "train_retriever_t5_stage2.sh",
                   "rerank_embed.sh"):
        res = _run(["bash", f"scripts/{script}", *(["--num-workers", "0"] if script == "prepare_emb.sh" else [])], env)
        logs[script] = res.stdout + res.stderr
    report = _run([sys.executable, "-m", "avg.experiments.report", str(work / "out" / "demo")], env)
    PIPELINE_LOGS.update(logs)
    PIPELINE_ENV.update(env, WORK=str(work))
    return work / "out" / "demo", report.stdout


PIPELINE_LOGS: dict = {}  # each stage script's output, captured (not a terminal) as under CI or nohup
PIPELINE_ENV: dict = {}  # the fixture's environment, for tests that run further scripts on its outputs


def test_every_stage_writes_its_contract(pipeline):
    root, _ = pipeline
    for rel in ("prepare_emb/index.json", "prepare_emb/image_features.npy", "eval_clip_baseline/metrics_clip_test.json",
                "train_rqvae/model.safetensors", "train_rqvae/config.json", "train_rqvae/checkpoints/last/train_state.json",
                "generate_codes/codes.json", "generate_codes/codebook.npy", "generate_codes/stats.json",
                "prepare_retriever_dataset/train.jsonl", "prepare_retriever_dataset/gallery_test.json",
                "train_retriever_t5/best/voken_vocab.json", "train_retriever_t5/eval/metrics_test.json",
                "train_retriever_t5_stage2/eval/metrics_test.json", "results.csv"):
        assert (root / rel).is_file(), rel


def test_codes_cover_every_image_and_collisions_are_reported(pipeline, tiny_demo):
    root, _ = pipeline
    codes = json.loads((root / "generate_codes" / "codes.json").read_text())
    images = json.loads(tiny_demo.json_path.read_text())["images"]
    assert set(codes["images"]) == {im["filename"] for im in images}
    stats = json.loads((root / "generate_codes" / "stats.json").read_text())
    distinct = len({tuple(v["code"]) for v in codes["images"].values()})
    assert stats["raw_collision_rate"] == pytest.approx(1 - distinct / len(images))  # raw codes (the default)
    assert codes["num_levels"] == 2 and codes["codebook_size"] == 8 and codes["code_len"] == 2
    assert set(stats["ceiling"]) == {"val", "test"}


def test_test_captions_stay_out_of_training_and_metrics_are_per_query(pipeline):
    root, report = pipeline
    train = [json.loads(x) for x in (root / "prepare_retriever_dataset" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (root / "prepare_retriever_dataset" / "test.jsonl").read_text().splitlines()]
    assert not ({q["image_id"] for q in train} & {q["image_id"] for q in test})
    for rel in ("eval_clip_baseline/metrics_clip_test.json", "train_retriever_t5/eval/metrics_test.json",
                "train_retriever_t5_stage2/eval/metrics_test.json"):
        m = json.loads((root / rel).read_text())
        assert m["num_queries"] == len(test) == 40 and 0 <= m["R@1"] <= m["R@5"] <= m.get("R@10", m["R@5"]) <= 100
    assert "avg_t5_stage2" in report and "clip_two_tower" in report


def test_stage_logs_have_lines_not_progress_bar_frames(pipeline):
    assert PIPELINE_LOGS, "the pipeline fixture records each script's output"
    for script, log in PIPELINE_LOGS.items():
        assert "\r" not in log, f"{script}: carriage-return progress frames in a captured log"


# ----------------------------------------------------------------------------- the search API and CLI
def _search_cli(root, *args, stdin=None, console=False):
    """``python -m avg search ...``, or the installed ``avg`` console command (the same entry point)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [str(Path(sys.executable).parent / "avg")] if console else [sys.executable, "-m", "avg"]
    return subprocess.run([*cmd, "search", "--run", str(root), *map(str, args)], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_api_ranks_test_queries_exactly_as_the_stage_did(pipeline):
    from avg import Hit, Retriever
    from avg.artifacts.runfiles import read_run

    root, _ = pipeline
    r = Retriever.from_run(root)
    assert r.model.prefix is not None, "the demo retriever reads the query's CLIP feature: the API must encode it"
    runs = read_run(root / "train_retriever_t5_stage2" / "eval" / "run_test.jsonl")
    hits = r.search([x.query for x in runs], k=r.num_beams)
    assert len(hits) == len(runs)
    for rec, hs in zip(runs, hits):
        k = min(len(hs), len(rec.ranked))
        assert [h.image_id for h in hs[:k]] == list(rec.ranked[:k]), rec.query
        assert [h.score for h in hs[:k]] == pytest.approx(list(rec.scores[:k]), abs=1e-4)
        assert all(isinstance(h, Hit) and Path(h.image_path).is_file() for h in hs)
    emb_runs = read_run(root / "rerank_embed" / "run_test.jsonl")
    reranked = r.search([x.query for x in emb_runs], k=5, rerank="embed")
    for rec, hs in zip(emb_runs, reranked):
        assert [h.image_id for h in hs] == list(rec.ranked[:5]), rec.query
    stage1 = Retriever.from_run(root, stage="train_retriever_t5", gallery=root / "generate_codes", image_ids=["test_000001.png", "val_000002.png"])
    assert len(stage1.gallery) == 2
    assert {h.image_id for h in stage1.search("a shape", k=2)[0]} <= {"test_000001.png", "val_000002.png"}


def test_search_cli_prints_ranked_images_and_json(pipeline):
    root, _ = pipeline
    res = _search_cli(root, "a tiny blue hexagon", "two red circles", "--k", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "query 1: a tiny blue hexagon" and lines[4] == "query 2: two red circles"
    assert len(lines) == 8 and all(Path(line.split()[-1]).is_file() for line in lines[1:4])
    res = _search_cli(root, "--json", "--k", "2", "--rerank", "embed", "--queries-file", "-", stdin="a red circle\na big star\n",
                      console=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert [o["query"] for o in out] == ["a red circle", "a big star"]
    assert all(len(o["hits"]) == 2 and o["hits"][0]["rank"] == 1 and o["hits"][0]["score"] >= o["hits"][1]["score"]
               for o in out)


def test_search_cli_errors_are_one_clear_line(pipeline, tmp_path):
    from avg.cli import main
    from avg.core.io import InputError

    root, _ = pipeline
    with pytest.raises(InputError, match="query 2 on the command line is empty"):
        main(["search", "--run", str(root), "a circle", "  "])
    (tmp_path / "q.txt").write_text("a circle\n\nstar\n")
    with pytest.raises(InputError, match=r"q\.txt: line 2: empty query"):
        main(["search", "--run", str(root), "--queries-file", str(tmp_path / "q.txt")])
    with pytest.raises(InputError, match="run directory not found"):
        main(["search", "--run", str(tmp_path / "nope"), "a circle"])
    with pytest.raises(InputError, match="no trained T5 retriever"):
        main(["search", "--run", str(tmp_path), "a circle"])
    other = tmp_path / "gallery.json"
    other.write_text(json.dumps({"test_000001.png": [1, 2, 3, 4, 5, 6]}))
    with pytest.raises(InputError, match="gallery of other codes"):
        main(["search", "--run", str(root), "--gallery", str(other), "a circle"])
    res = _search_cli(root, "")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "error: query 1 on the command line is empty"


# ----------------------------------------------------------------------------- the results page
def _page_counts(text: str) -> tuple[int, int]:
    import re

    return len(re.findall(r'<section class="query"', text)), len(re.findall(r'<tr class="result"', text))


def test_results_page_shows_each_system_per_sampled_query(pipeline):
    root, report = pipeline
    page = root / "results.html"
    assert page.is_file() and "results.html" in (root / "results.md").read_text()
    text = page.read_text()
    queries, rows = _page_counts(text)
    systems = {"clip_two_tower", "avg_t5_stage1", "avg_t5_stage2", "train_retriever_t5_stage2+embed_rerank"}
    assert queries == 12 and rows == queries * len(systems)
    assert all(f'data-system="{s}"' in text for s in systems)
    assert text.count("data:image/jpeg;base64,") >= queries  # thumbnails embedded: one file, no server
    assert 'class="cand hit"' in text or "gold not in its" in text


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_results_page_renders_in_a_headless_browser(pipeline, tmp_path):
    import subprocess

    import numpy as np
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here and scripts/install_browser.sh could not install it (needs root and apt-get)")
    root, _ = pipeline
    page = (root / "results.html").resolve()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "page.png"
    res = subprocess.run([browser, *flags, "--window-size=1200,900", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (900, 1200) and pixels.std() > 10  # text, tables and thumbnails, not a blank page
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert _page_counts(dom.stdout) == _page_counts(page.read_text()) and _page_counts(dom.stdout)[0] == 12


def test_reranker_seeds_runner_trains_each_seed_and_tables_them(pipeline):
    """scripts/run_reranker_seeds.sh on the tiny run: lists once, a reranker per seed, the CLIP baseline
    linked in, mean ± std and the reranker against the order of its lists."""
    root, _ = pipeline
    work = Path(PIPELINE_ENV["WORK"])
    env = dict(PIPELINE_ENV, SEEDS="0 1", SEEDS_DIR=str(work / "rseeds"), RERANK_MODEL=str(work / "llama-demo"),
               RERANK_EPOCHS="1", RERANK_BATCH_SIZE="8", RERANK_ARGS="--late-interaction --embed-fusion learned")
    missing = _run_fail(["bash", "scripts/run_reranker_seeds.sh"], env)
    assert missing.returncode == 2 and "convert_voken_to_seed is missing" in missing.stderr
    _run(["bash", "scripts/convert_voken_to_seed.sh"], env)
    res = _run(["bash", "scripts/run_reranker_seeds.sh"], env, timeout=900)
    lists = root / "prepare_reranker_dataset_seeds"
    meta = json.loads((lists / "meta.json").read_text())
    assert "CLIP features" in meta["splits"]["train"]["source"] and "run file" in meta["splits"]["test"]["source"]
    for s in ("0", "1"):
        seed_root = work / "rseeds" / f"seed_{s}" / "demo"
        assert json.loads((seed_root / "finetune_reranker_llama" / "stage.json").read_text())["config"]["seed"] == int(s)
        assert (seed_root / "test_reranker_llama" / "metrics_test.json").is_file()
    md = (work / "rseeds" / "demo" / "results_seeds.md").read_text()
    assert "| clip_two_tower | eval_clip_baseline | test | 2 |" in md and "| avg_reranker | test_reranker_llama | test | 2 |" in md
    assert "| LM reranker − its input | 2 |" in md and "results_seeds.md" in res.stdout
    # the API's rerank="lm": a trained reranker at query time ranks as its test stage ranked the same lists
    from avg import Retriever
    from avg.artifacts.runfiles import read_run

    seed0 = work / "rseeds" / "seed_0" / "demo" / "finetune_reranker_llama"
    stage_run = read_run(seed0.parent / "test_reranker_llama" / "run_test.jsonl")
    r = Retriever.from_run(root, reranker=seed0 / "best")
    hits = r.search([x.query for x in stage_run], k=5, rerank="lm")
    for rec, hs in zip(stage_run, hits):
        assert [h.image_id for h in hs] == list(rec.ranked[:5]), rec.query
        assert [h.score for h in hs] == pytest.approx(list(rec.scores[:5]), abs=1e-4)
    from avg.core.io import InputError

    with pytest.raises(InputError, match="no trained LM reranker"):
        Retriever.from_run(root).search("a circle", rerank="lm")  # this run's own finetune_reranker_llama/ was never trained
    cli = _search_cli(root, "--rerank", "lm", "a circle")
    assert cli.returncode == 2 and "no trained LM reranker" in cli.stderr

    def run_ids():
        return [json.loads(p.read_text())["run_id"] for p in sorted((work / "rseeds").rglob("stage.json"))]

    before = run_ids()
    assert len(before) == 4  # finetune_reranker_llama and test_reranker_llama per seed
    _run(["bash", "scripts/run_reranker_seeds.sh"], env)  # finished seeds are skipped: nothing re-runs
    assert run_ids() == before


def _run_fail(cmd, env):
    import subprocess

    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
