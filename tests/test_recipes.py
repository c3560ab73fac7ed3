"""Recipes (configs/recipes/<name>.sh): the method as one variable. A recipe sets only method variables and a
dataset config none of them, so RECIPE=<name> decides the method of every dataset; the environment still wins
variable by variable; an unknown recipe is one clear error; every stage.json records the recipe."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.sh"))
DATASETS = sorted(p.stem for p in (ROOT / "configs").glob("*.sh"))
BASES = sorted((ROOT / "configs" / "base").glob("*.sh"))  # what dataset configs source: no method either


def _assigned(path: Path) -> set[str]:
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.M))


def _config(dataset: str, **env) -> dict:
    """The variables scripts/common.sh leaves set for DATASET=dataset (with env overrides), as bash sees them."""
    names = sorted(_assigned(ROOT / "configs" / "recipes" / "paper.sh") | {"RECIPE", "AVG_RECIPE", "STAGE_ROOT"})
    script = "source scripts/common.sh >/dev/null; " + "; ".join(f'echo "{n}=${{{n}}}"' for n in names)
    full = {k: v for k, v in os.environ.items() if k not in names}
    full.update(DATASET=dataset, ALLOW_CPU="1", **env)
    res = subprocess.run(["bash", "-c", script], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines())


#: method variables a dataset config pins on purpose (its comment says why)
PINNED = {"demo": {"RERANK_ARGS"}}


def test_recipes_set_the_same_method_variables_and_datasets_set_none():
    assert RECIPES == ["best", "paper"]
    method = _assigned(ROOT / "configs" / "recipes" / "paper.sh")
    assert method == _assigned(ROOT / "configs" / "recipes" / "best.sh")
    assert {"T5_SCORE", "VOKEN_TOKENS", "T5_QUERY_PREFIX", "DIS_WEIGHT", "DIS_LISTS", "RERANK_MODEL"} <= method
    for name in DATASETS:
        assert _assigned(ROOT / "configs" / f"{name}.sh") & method == PINNED.get(name, set()), name
    for base in BASES:
        assert not _assigned(base) & method, base


def test_one_variable_chooses_the_method_and_the_environment_wins():
    paper = _config("flickr30k")
    assert (paper["RECIPE"], paper["AVG_RECIPE"], paper["T5_SCORE"], paper["VOKEN_TOKENS"], paper["T5_QUERY_PREFIX"],
            paper["DIS_LISTS"], paper["RERANK_FUSION"]) == ("paper", "paper", "vocab", "shared", "0", "all", "none")
    assert paper["RERANK_MODEL"] == "meta-llama/Llama-2-7b-hf"  # no SEED_LLAMA_MODEL given
    assert _config("flickr30k", SEED_LLAMA_MODEL="/models/seed")["RERANK_MODEL"] == "/models/seed"
    best = _config("coco", RECIPE="best")
    assert (best["T5_SCORE"], best["VOKEN_TOKENS"], best["T5_QUERY_PREFIX"], best["DIS_LISTS"]) == \
        ("children", "per-level", "4", "found")
    assert "--grid-head" in best["RERANK_ARGS"] and best["EMB_IMAGE_GRID"] == "4"
    assert _config("coco", RECIPE="best", T5_SCORE="vocab")["T5_SCORE"] == "vocab"
    assert _config("demo")["RECIPE"] == "best" and _config("demo", RECIPE="paper")["T5_SCORE"] == "vocab"


def test_an_unknown_recipe_is_one_clear_error():
    env = {**os.environ, "DATASET": "demo", "RECIPE": "fast"}
    res = subprocess.run(["bash", "-c", "source scripts/common.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: no recipe file configs/recipes/fast.sh for RECIPE=fast (available: best paper )"


@pytest.mark.parametrize("recipe", [None, "best"])
def test_stage_manifests_record_the_recipe(tmp_path, monkeypatch, recipe):
    from avg.core.stages import RECIPE_ENV, begin_stage

    if recipe:
        monkeypatch.setenv(RECIPE_ENV, recipe)
    else:
        monkeypatch.delenv(RECIPE_ENV, raising=False)
    begin_stage(tmp_path / "out", "train_rqvae", {"lr": 1e-3}).complete()
    assert json.loads((tmp_path / "out" / "stage.json").read_text())["recipe"] == recipe
