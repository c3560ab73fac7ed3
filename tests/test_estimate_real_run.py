"""tools/estimate_real_run.py: parameter counts of the real configs' shapes and the arithmetic of its tables."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def est():
    spec = importlib.util.spec_from_file_location("estimate_real_run", ROOT / "tools" / "estimate_real_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parameter_counts_are_the_real_models(est):
    p = est.models()
    # T5-base is 223M with its 32,128-row vocabulary; 4 x 1,024 voken rows add 4,096 x 768 (shared embedding, tied head)
    assert 222e6 < p["t5"] - 4096 * 768 < 224e6
    assert 6.7e9 < p["llama"] < 6.8e9 and p["llama_body"] < p["llama"]   # LLaMA-2-7B (untied head) + vokens
    assert 300e6 < p["clip_vision"] < 310e6 and 120e6 < p["clip_text"] < 125e6   # ViT-L/14-336 and its text tower
    assert p["t5_encoder"] + p["t5_decoder"] + p["t5_head"] == p["t5"]


def test_tables_add_up(est, capsys):
    assert est.main([]) == 0
    out = capsys.readouterr().out
    assert "**Flickr30K**" in out and "**COCO**" in out
    p = est.models()
    for d in est.DATASETS.values():
        rows = est.stages(p, d)
        assert len(rows) == 7 and all(r["flops"] > 0 and r["memory"] > 0 for r in rows)
        # four GPUs take a quarter of one GPU's time; an H100 is faster than an A100
        for r in rows:
            one, four = est.hours(r["flops"], r["kind"], "A100", 1), est.hours(r["flops"], r["kind"], "A100", 4)
            assert four == pytest.approx(one / 4) and est.hours(r["flops"], r["kind"], "H100", 1) < one
    coco, flickr = (est.stages(p, est.DATASETS[k]) for k in ("COCO", "Flickr30K"))
    assert coco[1]["flops"] > 3 * flickr[1]["flops"]   # 3.8 x the training captions


def test_measure_times_a_t5_step_and_a_llama_layer(est):
    """--measure's code path at tiny shapes (the real ones take minutes on a CPU): both timings and their rates."""
    tiny_t5 = dict(est.T5_BASE, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2)
    lines = est.measure(t5_shape=tiny_t5, vokens=64, llama_layer=dict(hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=4), batch=4, prompts=2, repeats=2)
    t5, llama = (line for line in lines if line.startswith("- "))
    assert t5.startswith("- T5 training step") and "GFLOP/s" in t5
    assert "LLaMA decoder layer" in llama and "a step of 2 prompts" in llama
