"""The rehearsal of the real run (scripts/rehearse.sh): its stand-ins have the real components' types and
layouts, and the real configs run end to end on them -- Flickr30K with the paper's recipe on one process (then
its models evaluated by two), COCO with this project's best recipe on two -- with nothing reaching the hub."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    tool = load_tool("make_rehearsal_fixture")
    out = tmp_path_factory.mktemp("rehearsal") / "fixture"
    tool.main(["--out-dir", str(out)])
    return out


def test_datasets_have_the_karpathy_files_fields(fixture_dir):
    from avg.data.karpathy import load_karpathy

    flickr = json.loads((fixture_dir / "flickr30k" / "dataset_flickr30k.json").read_text())
    im = flickr["images"][0]
    assert set(im) == {"sentids", "imgid", "sentences", "split", "filename"} and flickr["dataset"] == "flickr30k"
    assert set(im["sentences"][0]) == {"tokens", "raw", "imgid", "sentid"}
    assert im["sentids"] == [s["sentid"] for s in im["sentences"]] and im["filename"].endswith(".jpg")
    coco = json.loads((fixture_dir / "coco" / "dataset_coco.json").read_text())
    splits = {x["split"] for x in coco["images"]}
    assert splits == {"train", "restval", "val", "test"}
    assert {x["filepath"] for x in coco["images"]} == {"train2014", "val2014"} and all("cocoid" in x for x in coco["images"])
    assert max(len(x["sentences"]) for x in coco["images"]) == 7
    for name, folder in (("dataset_flickr30k.json", "flickr30k"), ("dataset_coco.json", "coco")):
        data = load_karpathy(fixture_dir / folder / name, fixture_dir / folder if folder == "coco" else
                             fixture_dir / folder / "flickr30k-images")
        assert data.counts()["test"]["images"] == 16
    from PIL import Image

    modes = {Image.open(fixture_dir / "coco" / x["filepath"] / x["filename"]).mode for x in coco["images"]}
    assert modes == {"RGB", "L"}  # COCO has grayscale JPEGs
    assert max(len(s["raw"].split()) for x in flickr["images"] for s in x["sentences"]) > 77


def test_models_load_by_their_hub_names_offline_with_the_real_layouts(fixture_dir):
    code = """
import json, os
from transformers import AutoConfig, AutoTokenizer
t5 = AutoTokenizer.from_pretrained("t5-base"); t5c = AutoConfig.from_pretrained("t5-base")
ll = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf"); llc = AutoConfig.from_pretrained("meta-llama/Llama-2-7b-hf")
clip = AutoTokenizer.from_pretrained("openai/clip-vit-large-patch14-336")
seed = AutoTokenizer.from_pretrained(os.environ["SEED"])
print(json.dumps({"t5": [type(t5).__name__, len(t5), t5c.vocab_size, t5.convert_ids_to_tokens(t5("a red star").input_ids)[-1]],
                  "llama": [type(ll).__name__, ll.pad_token, llc.tie_word_embeddings, str(llc.dtype), ll("a").input_ids[0]],
                  "clip": [clip.bos_token, clip.bos_token_id, len(clip)],
                  "seed": [len(seed) - len(ll), seed.convert_tokens_to_ids("<img_08191>") >= len(ll)]}))
"""
    env = {**os.environ, "HF_HOME": str(fixture_dir / "hf"), "HF_HUB_OFFLINE": "1", "SEED": str(fixture_dir / "seed-llama")}
    res = subprocess.run([os.sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    kind, n_tokens, rows, last = got["t5"]
    # SentencePiece T5: 100 <extra_id_*> tokens, the embedding padded to a multiple of 128 rows as t5-base's, EOS appended
    assert kind == "T5Tokenizer" and rows % 128 == 0 and rows > n_tokens and last == "</s>"
    assert got["llama"][:3] == ["LlamaTokenizer", None, False] and got["llama"][3] == "torch.float16" and got["llama"][4] == 1
    assert got["clip"] == ["<|startoftext|>", 49406, 49408]
    assert got["seed"] == [8194, True]  # <img>, </img>, <img_00000> ... <img_08191>


def test_same_ranking_allows_only_near_ties_to_swap():
    from avg.experiments.rehearsal import same_ranking

    run = lambda ranked, scores: SimpleNamespace(ranked=ranked, scores=scores)  # noqa: E731
    a = run(["x", "y", "z"], [-1.0, -2.0, -2.01])
    assert same_ranking(a, run(["x", "z", "y"], [-1.0, -2.005, -2.006]), tol=0.05)      # a near-tie swapped
    assert same_ranking(a, run(["x", "y", "w"], [-1.0, -2.0, -2.0]), tol=0.05)          # the boundary image swapped
    assert not same_ranking(a, run(["x", "y", "w"], [-1.0, -2.0, -1.5]), tol=0.05)      # another image, well inside
    assert not same_ranking(a, run(["y", "x", "z"], [-1.0, -2.0, -2.01]), tol=0.05)     # scores of other images
    assert not same_ranking(a, run(["x", "z", "y"], [-1.0, -2.005, -2.006]), tol=1e-4)
    big = run(["x", "y"], [-36.27, -37.2])
    assert same_ranking(big, run(["x", "y"], [-36.29, -37.22]), tol=0.0, rtol=0.01)     # relative to the score's size
    assert not same_ranking(big, run(["x", "y"], [-36.29, -37.22]), tol=0.0)


@pytest.mark.slow
def test_the_real_configs_run_end_to_end_on_the_stand_ins(fixture_dir, tmp_path):
    """Flickr30K + recipe paper on one process, then two processes evaluate its models; COCO + recipe best on two
    (accelerate launch). Every stage, the efficiency benchmark and the report; hub access would raise (offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env.update(WANDB_MODE="offline", PYTHONWARNINGS="default")
    res = subprocess.run(["bash", "scripts/rehearse.sh", "--runs", "flickr30k:paper:1,coco:best:2", "--jobs", "2",
                          "--work", str(tmp_path / "work"), "--fixture", str(fixture_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    oks = [line for line in log.splitlines() if line.startswith("[rehearsal] ok")]
    assert len(oks) == 3, log[-3000:]  # two runs checked, one two-process evaluation compared
    assert "rank as by one" in oks[1]
    assert "deprecated" not in log.lower() and "Token indices sequence length" not in log
    paper = tmp_path / "work" / "paper-1p" / "flickr30k"
    best = tmp_path / "work" / "best-2p" / "coco"
    manifest = json.loads((paper / "train_retriever_t5" / "stage.json").read_text())
    assert manifest["recipe"] == "paper" and manifest["config"]["score"] == "vocab"
    assert manifest["config"]["voken_tokens"] == "shared" and manifest["config"]["query_prefix"] == 0
    assert manifest["inputs"]["t5-base"].startswith("hub:t5-base@")  # the hub name, resolved in the local cache
    stage2 = json.loads((paper / "train_retriever_t5_stage2" / "stage.json").read_text())["config"]
    assert stage2["dis_lists"] == "all" and stage2["dis_weight"] == 1.0
    reranker = json.loads((paper / "finetune_reranker_llama" / "stage.json").read_text())["config"]
    assert reranker["model"].endswith("seed-llama") and not reranker["late_interaction"]
    best_rr = json.loads((best / "finetune_reranker_llama" / "stage.json").read_text())
    assert best_rr["recipe"] == "best" and best_rr["config"]["grid_head"] == 8
    assert "x 2 process(es)" in (best / "finetune_reranker_llama" / "train.log").read_text()
