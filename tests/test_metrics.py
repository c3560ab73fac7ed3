import math
import random

import pytest

from avg.artifacts.runfiles import RunRecord, read_run, write_run
from avg.metrics import first_hit_rank, retrieval_metrics
from avg.core.io import InputError


def naive_recall(records, k):
    hits = 0
    for r in records:
        dedup = list(dict.fromkeys(r["ranked"]))
        gold = set(r["gold"]) if isinstance(r["gold"], list) else {r["gold"]}
        hits += any(x in gold for x in dedup[:k])
    return 100.0 * hits / len(records)


def test_hand_computed_case():
    records = [
        {"ranked": ["a", "b", "c"], "gold": "a"},  # rank 1
        {"ranked": ["b", "a", "c"], "gold": "c"},  # rank 3
        {"ranked": ["b", "c"], "gold": "a"},  # not found
        {"ranked": ["b", "b", "a"], "gold": "a"},  # duplicate occupies one rank -> rank 2
    ]
    m = retrieval_metrics(records, ks=(1, 2, 3), gallery_size=10)
    assert m["R@1"] == 25.0
    assert m["R@2"] == 50.0
    assert m["R@3"] == 75.0
    assert m["not_found"] == 1
    assert m["mean_rank"] == pytest.approx((1 + 3 + 10 + 2) / 4)
    m2 = retrieval_metrics(records, ks=(1,))
    assert m2["mean_rank"] == pytest.approx(2.0)


def test_against_naive_reference_on_random_runs():
    rng = random.Random(0)
    images = [f"img{i}" for i in range(30)]
    records = []
    for q in range(200):
        ranked = rng.sample(images, rng.randint(0, 15))
        gold = rng.choice(images) if q % 7 else rng.sample(images, 2)
        records.append({"ranked": ranked, "gold": gold})
    m = retrieval_metrics(records, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert m[f"R@{k}"] == pytest.approx(naive_recall(records, k))


def test_multi_positive_gold_and_record_objects():
    rec = RunRecord(qid=0, query="q", gold=["x", "y"], ranked=["z", "y"], scores=[0.0, -1.0])
    assert first_hit_rank(rec.ranked, rec.gold) == 2
    assert retrieval_metrics([rec])["R@5"] == 100.0


def test_empty_raises():
    with pytest.raises(ValueError):
        retrieval_metrics([])


def test_run_file_round_trip_and_errors(tmp_path):
    recs = [RunRecord(qid=i, query=f"q{i}", gold=f"g{i}", ranked=[f"g{i}", "x"], scores=[-0.5, -1.5]) for i in range(3)]
    path = tmp_path / "run.jsonl"
    assert write_run(recs, path) == 3
    back = read_run(path)
    assert [r.to_json() for r in back] == [r.to_json() for r in recs]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 0, "gold": "a", "ranked": ["a"], "scores": [1, 2]}\n')
    with pytest.raises(InputError, match="bad.jsonl: line 1: 1 ranked ids but 2 scores"):
        read_run(bad)
    bad.write_text('{"qid": 0, "gold": "a", "ranked": ["a"]}\n\n{"qid": 1, "ranked": ["a"]}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 3: not a run record \('gold'\)"):
        read_run(bad)
    bad.write_text('{"qid": 0, "gold": "a", "ranked": ["a"]}\n{"qid": 1,\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2: malformed JSON"):
        read_run(bad)
    with pytest.raises(InputError, match="missing.jsonl: run file not found"):
        read_run(tmp_path / "missing.jsonl")
    assert not math.isnan(retrieval_metrics(back)["mean_rank"])
