"""The reranker stage on tiny data and a tiny random LLaMA (CPU): candidate lists, image-token
mapping, last-token scoring under any padding, losses against hand computations, save/reload,
and the three entry points end to end (prepare with and without a retriever search, train,
resume, test)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avg.artifacts.runfiles import write_run
from avg.reranker import model as RM
from avg.reranker import lm_setup
from avg.reranker import saving
from avg.reranker import scoring
from avg.stages import test_reranker_llama as rerank_test, prepare_reranker_dataset as prepare_dataset, finetune_reranker_llama as train
from avg.reranker.data import ListCollator, ListDataset, candidate_list, candidate_lists, load_lists, unflatten
from avg.reranker.image_tokens import ImageTokenMap, ImageTokens, build_image_tokens, image_token
from avg.objectives.rerank import listwise_loss, pointwise_loss
from avg.retriever import llama as L
from avg.retriever.data import CodesData
from avg.core.io import InputError
from conftest import load_tool

WORDS = "caption : image a the red blue green cube ball cone on table is".split()
COLORS, SHAPES = ("red", "blue", "green"), ("cube", "ball", "cone")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tokenizer(extra=()):
    """LLaMA-like word-level tokenizer: <unk>/<s>/</s> = 0/1/2, BOS prepended, no pad token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in list(WORDS) + list(extra):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_llama(vocab_size: int, *, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def codes_data(n_images: int = 12, rng_seed: int = 0) -> CodesData:
    """M=2 shared codebook of N=4 + a disambiguation position of K=3, unique codes."""
    rng = np.random.default_rng(rng_seed)
    pairs = [(a, b) for a in range(4) for b in range(4)]
    pick = rng.permutation(len(pairs))[:n_images]
    images = {}
    for i, p in enumerate(pick):
        split = "train" if i < n_images // 2 else ("val" if i < 3 * n_images // 4 else "test")
        images[f"img{i}"] = {"code": [pairs[p][0], pairs[p][1], i % 3], "split": split}
    meta = {"num_levels": 2, "codebook_size": 4, "shared_codebook": True, "code_len": 3, "disambiguation": True,
            "disambiguation_size": 3}
    return CodesData(meta=meta, images=images, codebook=rng.normal(size=(1, 4, 8)).astype(np.float32))


def caption(i: int) -> str:
    return f"a {COLORS[i % 3]} {SHAPES[(i // 3) % 3]} on the table"


def fake_records(image_ids, n_queries: int, k: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for q in range(n_queries):
        gold = image_ids[q % len(image_ids)]
        ranked = [image_ids[j] for j in rng.permutation(len(image_ids))[:k]]
        recs.append({"qid": q, "query": caption(q), "gold": gold, "ranked": ranked,
                     "scores": sorted(rng.normal(-5, 1, size=len(ranked)).tolist(), reverse=True)})
    return recs


# ---------------------------------------------------------------------------- candidate lists
def test_training_lists_always_hold_the_positive_and_eval_lists_are_untouched():
    ids = [f"img{i}" for i in range(10)]
    recs = fake_records(ids, 40, 6, seed=1)
    lists = candidate_lists(recs, 4, insert_positive=True)
    for rec, lst in zip(recs, lists):
        assert lst["gold"] in lst["candidates"] and len(lst["candidates"]) == 4
        assert len(set(lst["candidates"])) == 4
        if lst["inserted"]:
            assert rec["gold"] not in rec["ranked"][:4] and lst["gold_rank"] is None
            assert lst["candidates"][:3] == rec["ranked"][:3] and lst["candidates"][3] == rec["gold"]
            assert lst["scores"][3] is None and lst["scores"][:3] == rec["scores"][:3]
        else:
            assert lst["candidates"] == rec["ranked"][:4] and lst["scores"] == rec["scores"][:4]
            assert lst["candidates"][lst["gold_rank"] - 1] == rec["gold"]
    assert any(x["inserted"] for x in lists) and not all(x["inserted"] for x in lists)
    evals = candidate_lists(recs, 4, insert_positive=False)
    assert all(not x["inserted"] and x["candidates"] == r["ranked"][:4] for x, r in zip(evals, recs))
    # a short beam list gets the positive appended, not a candidate dropped
    short = candidate_list({"qid": 0, "query": "q", "gold": "g", "ranked": ["a", "b"], "scores": [-1, -2]}, 5,
                           insert_positive=True)
    assert short["candidates"] == ["a", "b", "g"] and short["scores"] == [-1.0, -2.0, None]


# ---------------------------------------------------------------------------- image tokens
def test_voken_to_seed_mapping_offsets_and_bounds_check():
    codes = codes_data()
    m = ImageTokenMap.from_codes_meta(codes.meta)
    assert m.offsets == [0, 0, 4] and m.sizes == [4, 4, 3] and m.num_tokens == 7
    assert m.to_indices([3, 1, 2]) == [3, 1, 6]
    per_level = ImageTokenMap.from_codes_meta(dict(codes.meta, shared_codebook=False), rich_levels=2, rich_size=5)
    assert per_level.offsets == [0, 4, 8, 11, 16] and per_level.num_tokens == 21
    assert per_level.to_indices([3, 3, 2, 4, 0]) == [3, 7, 10, 15, 16]
    with pytest.raises(InputError, match="position 2 value 3"):
        m.to_indices([0, 0, 3])
    m.check_fits(7)
    with pytest.raises(InputError, match="needs 7 image tokens"):
        m.check_fits(6)
    # SEED-sized: 8192 holds a 1024-shared codebook + disambiguation, not 8 levels x 1024 per level
    big = ImageTokenMap.from_codes_meta({"num_levels": 8, "codebook_size": 1024, "shared_codebook": False,
                                         "disambiguation": True, "disambiguation_size": 5})
    with pytest.raises(InputError, match="8197 image tokens"):
        big.check_fits(8192)
    tokens = build_image_tokens(codes)
    assert tokens.images["img0"] == m.to_indices(codes.images["img0"]["code"])
    assert np.allclose(tokens.vectors[:4], codes.codebook[0]) and np.isnan(tokens.vectors[4:]).all()


def test_rich_tokens_fit_on_train_images_and_follow_the_vokens(tmp_path):
    codes = codes_data()
    ids = sorted(codes.images)
    feats = np.random.default_rng(0).normal(size=(len(ids), 6)).astype(np.float32)
    train_ids = [i for i in ids if codes.images[i]["split"] == "train"]
    tok = build_image_tokens(codes, rich_features=feats, rich_image_ids=ids, rich_fit_ids=train_ids,
                             rich_levels=2, rich_size=3, seed=0)
    assert tok.mapping.length == 5 and tok.mapping.num_tokens == 7 + 6
    for i in ids:
        seq = tok.images[i]
        assert 7 <= seq[3] < 10 and 10 <= seq[4] < 13
    tok.save(tmp_path)
    again = ImageTokens.load(tmp_path)
    assert again.images == tok.images and again.mapping.to_dict() == tok.mapping.to_dict()
    with pytest.raises(InputError, match="capacity 10"):
        build_image_tokens(codes, rich_features=feats, rich_image_ids=ids, rich_fit_ids=train_ids,
                           rich_levels=2, rich_size=3, capacity=10)


def test_seed_style_vocabulary_is_reused_and_checked_other_models_get_tokens_added():
    m = ImageTokenMap.from_codes_meta(codes_data().meta)
    seed_tok = make_tokenizer(extra=[image_token(i) for i in range(8)])
    lm = make_llama(len(seed_tok))
    before = lm.get_input_embeddings().weight.detach().clone()
    ids, added = lm_setup.ensure_image_tokens(seed_tok, lm, m, reuse_rows=True)
    assert not added and ids.tolist() == seed_tok.convert_tokens_to_ids([image_token(i) for i in range(7)])
    assert torch.equal(lm.get_input_embeddings().weight, before)  # SEED's own rows kept, when asked
    small = make_tokenizer(extra=[image_token(i) for i in range(5)])
    with pytest.raises(InputError, match="only 5 exist"):
        lm_setup.ensure_image_tokens(small, make_llama(len(small)), m)
    plain = make_tokenizer()
    lm = make_llama(len(plain), tied=False)
    n0 = len(plain)
    ids, added = lm_setup.ensure_image_tokens(plain, lm, m, build_image_tokens(codes_data()).vectors)
    assert added and ids.tolist() == list(range(n0, n0 + 7))
    assert lm.get_input_embeddings().weight.shape[0] == n0 + 7 == lm.get_output_embeddings().weight.shape[0]
    assert plain.tokenize(image_token(3) + image_token(0)) == [image_token(3), image_token(0)]


# ---------------------------------------------------------------------------- scoring
def tiny_reranker(tied=True, fusion="learned", seed=0):
    codes = codes_data()
    tokens = build_image_tokens(codes)
    tok = L.prepare_tokenizer(make_tokenizer())
    lm = make_llama(len(tok), tied=tied, seed=seed)
    ids, added = lm_setup.ensure_image_tokens(tok, lm, tokens.mapping, tokens.vectors, seed=seed)
    torch.manual_seed(seed)
    return tok, RM.Reranker(lm, head_inner=16, head_dropout=0.0, fusion=fusion, fusion_weight=0.7), tokens, ids


def tiny_dataset(tok, tokens, ids, n=6, k=5, seed=3):
    image_ids = sorted(tokens.images)
    lists = candidate_lists(fake_records(image_ids, n, k, seed), k, insert_positive=False)
    lists[1]["query"] = "a red cube on the table is a red cube on the table"  # prompts of different lengths
    lists[2]["candidates"], lists[2]["scores"] = lists[2]["candidates"][:3], lists[2]["scores"][:3]  # a short list
    return ListDataset(lists, tok, saving.image_token_ids(tokens, ids), L.prompt_formatter(RM.DEFAULT_PROMPT_TEMPLATE))


@torch.no_grad()
def test_head_reads_last_non_pad_token_with_left_right_padding_and_shared_prefix():
    tok, rr, tokens, ids = tiny_reranker()
    rr.eval()
    ds = tiny_dataset(tok, tokens, ids)
    idx = list(range(len(ds)))
    right = ListCollator(ds, "right")(idx)
    left = ListCollator(ds, "left")(idx)
    assert (right["attention_mask"] == 0).any() and (left["attention_mask"][:, 0] == 0).any()
    s_right = rr(right["input_ids"], right["attention_mask"])
    s_left = rr(left["input_ids"], left["attention_mask"])
    # reference: each sequence alone, no padding, head on its last hidden state
    body = rr.body()
    ref = []
    for i in idx:
        for c in ds.lists[i]["candidates"]:
            seq = torch.tensor([ds.prompts[i] + ds.image_ids[c] + [ds.eos]])
            h = body(input_ids=seq).last_hidden_state[0, -1]
            ref.append(rr.head(h))
    ref = torch.stack(ref)
    assert torch.allclose(s_right, ref, atol=1e-5) and torch.allclose(s_left, ref, atol=1e-5)
    # pad ids are never read: other pad values, same scores
    junk = right["input_ids"].masked_fill(right["attention_mask"] == 0, 5)
    assert torch.allclose(rr(junk, right["attention_mask"]), ref, atol=1e-5)
    head, fused = rr(**scoring.model_inputs(right, "cpu"))  # shared-prefix path
    assert torch.allclose(head[right["valid"]], ref, atol=1e-5)
    assert torch.isinf(head[2, 3:]).all()
    top = right["retriever_scores"].masked_fill(~right["known"], -1e9).amax(1, keepdim=True)
    want = head + 0.7 * (right["retriever_scores"] - top)
    assert torch.allclose(fused[right["valid"]], want[right["valid"]], atol=1e-5)
    assert torch.allclose(unflatten(ref, right)[right["valid"]], ref)


def test_gradient_checkpointing_falls_back_to_full_sequences_with_equal_scores():
    tok, rr, tokens, ids = tiny_reranker()
    ds = tiny_dataset(tok, tokens, ids)
    batch = ListCollator(ds)(list(range(len(ds))))
    rr.eval()
    with torch.no_grad():
        ref, _ = rr(**scoring.model_inputs(batch, "cpu"))
    L.enable_checkpointing(rr.lm)
    rr.train()
    assert not rr.can_share_prefix()
    head, _ = rr(**scoring.model_inputs(batch, "cpu"))
    head[batch["valid"]].sum().backward()
    assert torch.allclose(head.detach()[batch["valid"]], ref[batch["valid"]], atol=1e-5)
    assert rr.lm.get_input_embeddings().weight.grad is not None
    rr.eval()
    assert rr.can_share_prefix()


def test_listwise_and_pointwise_losses_against_hand_computation():
    ninf = float("-inf")
    s = torch.tensor([[2.0, 0.5, -1.0, ninf], [0.0, 1.0, 3.0, 0.2], [1.0, 2.0, ninf, ninf]])
    labels = torch.tensor([1, 2, -1])
    z0 = math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)
    z1 = math.exp(0.0) + math.exp(1.0) + math.exp(3.0) + math.exp(0.2)
    want = (-(0.5 - math.log(z0)) - (3.0 - math.log(z1))) / 2
    assert math.isclose(float(listwise_loss(s, labels)), want, rel_tol=1e-6)
    z0t = sum(math.exp(v / 2) for v in (2.0, 0.5, -1.0))
    z1t = sum(math.exp(v / 2) for v in (0.0, 1.0, 3.0, 0.2))
    want_t = (-(0.25 - math.log(z0t)) - (1.5 - math.log(z1t))) / 2
    assert math.isclose(float(listwise_loss(s, labels, temperature=2.0)), want_t, rel_tol=1e-6)
    valid = torch.isfinite(s)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = [-math.log(1 - sig(2.0)), -math.log(sig(0.5)), -math.log(1 - sig(-1.0)),
             -math.log(1 - sig(0.0)), -math.log(1 - sig(1.0)), -math.log(sig(3.0)), -math.log(1 - sig(0.2))]
    assert math.isclose(float(pointwise_loss(s.masked_fill(~valid, 0), labels, valid)), sum(terms) / 7, rel_tol=1e-6)
    assert float(listwise_loss(s[2:], labels[2:])) == 0.0


# ---------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("lora", [False, True])
def test_save_reload_gives_identical_scores(tmp_path, lora):
    tok, rr, tokens, ids = tiny_reranker(tied=not lora, seed=1)
    base = tmp_path / "base"
    if lora:
        base_tok = make_tokenizer()
        make_llama(len(base_tok), tied=False, seed=1).save_pretrained(base)
        base_tok.save_pretrained(base)
        tok, lm = L.load_causal_lm(str(base))
        ids, _ = lm_setup.ensure_image_tokens(tok, lm, tokens.mapping, tokens.vectors, seed=1)
        lm = lm_setup.add_lora(lm, ids, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():  # make the adapter and the image-token rows non-trivial
            for n, p in lm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        rr = RM.Reranker(lm, head_inner=16, head_dropout=0.0, fusion="learned", fusion_weight=0.3)
    with torch.no_grad():
        rr.fusion_weight.fill_(0.42)
    rr.eval()
    ds = tiny_dataset(tok, tokens, ids)
    before = scoring.score_lists(rr, ds, 4, "cpu", show_progress=False)
    saving.save_reranker(rr, tok, tokens, tmp_path / "best", base_model=str(base), prompt_template=RM.DEFAULT_PROMPT_TEMPLATE,
                         max_length=64, image_tokens_added=True)
    for merge in ((True, False) if lora else (True,)):
        tok2, rr2, tokens2, meta = saving.load_reranker(tmp_path / "best", merge=merge)
        assert meta["lora"] is lora and float(rr2.fusion_weight.detach()) == pytest.approx(0.42)
        ids2 = torch.tensor(tok2.convert_tokens_to_ids([image_token(i) for i in range(tokens2.mapping.num_tokens)]))
        assert torch.equal(ids2, ids)
        ds2 = ListDataset(ds.lists, tok2, saving.image_token_ids(tokens2, ids2), L.prompt_formatter(meta["prompt_template"]))
        after = scoring.score_lists(rr2, ds2, 4, "cpu", show_progress=False)
        for i in before:
            assert np.allclose(before[i], after[i], atol=1e-5), (merge, i)


# ---------------------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """retriever_data-like galleries, run files for val/test, image tokens, a tiny LLaMA and a
    tiny saved LLaMA retriever (random) to search the training queries."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    root = tmp_path_factory.mktemp("rerank")
    codes = codes_data(n_images=16)
    data = root / "retriever_data"
    data.mkdir()
    for split in ("train", "val", "test"):
        ids = sorted(i for i, r in codes.images.items() if r["split"] == split)
        (data / f"gallery_{split}.json").write_text(json.dumps({i: codes.images[i]["code"] for i in ids}))
        with open(data / f"{split}.jsonl", "w") as f:
            for j, i in enumerate(ids * 3):
                f.write(json.dumps({"query": caption(j), "image_id": i, "code": codes.images[i]["code"]}) + "\n")
        if split != "train":
            write_run(fake_records(ids, 12, 3, seed=len(split)), root / f"run_{split}.jsonl")
    (data / "meta.json").write_text("{}")
    build_image_tokens(codes).save(root / "tokens")
    tok = make_tokenizer()
    make_llama(len(tok)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    # a saved (untrained) decoder-only retriever, for the search path of prepare
    from avg.retriever.vocab import VokenVocab
    rtok, rlm = L.load_causal_lm(str(root / "llama"))
    vocab = VokenVocab.from_meta(codes.meta)
    L.add_vokens(rtok, rlm, vocab, codes.codebook)
    L.save_retriever(rlm, rtok, vocab, root / "retriever", base_model=str(root / "llama"),
                     prompt_template=L.DEFAULT_PROMPT_TEMPLATE, max_length=32)
    yield root
    mp.undo()


def prepare_args(root, out, *extra):
    return ["--data-dir", str(root / "retriever_data"), "--retriever-dir", str(root / "retriever"), "--out-dir", str(out),
            "--run-file", f"val={root / 'run_val.jsonl'}", "--run-file", f"test={root / 'run_test.jsonl'}",
            "--topk", "3", "--train-gallery-size", "4", "--batch-size", "8", *extra]


def train_args(root, data, out, *extra):
    return ["--data-dir", str(data), "--tokens-dir", str(root / "tokens"), "--model", str(root / "llama"),
            "--out-dir", str(out), "--full-finetune", "--batch-size", "4", "--epochs", "2", "--head-inner", "16",
            "--lr", "1e-3", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def prepared(stage_inputs):
    out = stage_inputs / "reranker_data"
    meta = prepare_dataset.main(prepare_args(stage_inputs, out))
    return out, meta


def test_prepare_searches_train_in_gallery_chunks_and_reuses_run_files(stage_inputs, prepared):
    out, meta = prepared
    train_lists = load_lists(out / "train.jsonl")
    assert len(train_lists) == 24 and all(x["gold"] in x["candidates"] for x in train_lists)
    assert meta["splits"]["train"]["gallery_size"] == 4 and "retriever" in meta["splits"]["train"]["source"]
    from avg.search.gallery import Gallery
    chunks = Gallery.load(stage_inputs / "retriever_data" / "gallery_train.json").chunks(4, 42)
    assert [len(c) for c in chunks] == [4, 4]
    chunk_of = {i: n for n, c in enumerate(chunks) for i in c.image_ids}
    for x in train_lists:  # every list was searched in the chunk that holds its gold image
        assert {chunk_of[c] for c in x["candidates"]} == {chunk_of[x["gold"]]}
    test_lists = load_lists(out / "test.jsonl")
    runs = [json.loads(line) for line in open(stage_inputs / "run_test.jsonl")]
    assert [x["candidates"] for x in test_lists] == [r["ranked"][:3] for r in runs]
    assert not any(x["inserted"] for x in test_lists)
    assert json.loads((out / "stage.json").read_text())["status"] == "complete"


def test_prepare_bad_input_leaves_no_output(stage_inputs, tmp_path):
    bad = tmp_path / "bad_run.jsonl"
    bad.write_text('{"qid": 0, "query": "q", "gold": "img9", "ranked": ["a"], "scores": [1, 2]}\n')
    out = tmp_path / "out"
    with pytest.raises(InputError, match="bad_run.jsonl: line 1"):
        prepare_dataset.main(prepare_args(stage_inputs, out, "--run-file", f"val={bad}"))
    assert not (out / "val.jsonl").exists() and not (out / "train.jsonl").exists()
    with pytest.raises(InputError, match="--num-beams 2 < --topk 3"):
        prepare_dataset.main(prepare_args(stage_inputs, tmp_path / "o2", "--num-beams", "2"))


def test_train_test_end_to_end_and_resume_is_exact(stage_inputs, prepared, tmp_path):
    data, _ = prepared
    res = train.main(train_args(stage_inputs, data, tmp_path / "full"))
    assert res["global_step"] == 12 and (tmp_path / "full" / "best" / saving.META_FILE).is_file()
    lines = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert any("train/listwise" in x for x in lines) and any("eval/val/R@1" in x for x in lines)
    # interrupted after 5 steps, resumed: same final weights as the uninterrupted run
    part = tmp_path / "part"
    train.main(train_args(stage_inputs, data, part, "--stop-after-steps", "5"))
    train.main(train_args(stage_inputs, data, part, "--resume"))
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a different configuration in the same out-dir is refused
    with pytest.raises(InputError, match="different configuration"):
        train.main(train_args(stage_inputs, data, part, "--lr", "5e-4"))
    # --resume --force --epochs 3 extends the finished run from its checkpoint (every trainer's rule)
    more = train.main(train_args(stage_inputs, data, part, "--resume", "--force", "--epochs", "3"))
    log = (part / "train.log").read_text()
    assert more["global_step"] == 18 and "resuming from" in log and "done: 6 steps" in log  # epoch 3 alone
    out = tmp_path / "test"
    m = rerank_test.main(["--reranker-dir", str(tmp_path / "full" / "best"), "--data-dir", str(data),
                          "--out-dir", str(out), "--retriever-name", "toy", "--batch-size", "5"])
    assert m["system"] == "avg_reranker" and m["num_queries"] == 12 and m["before"]["system"] == "toy_top3"
    saved = json.loads((out / "metrics_test.json").read_text())
    before = json.loads((out / "metrics_toy_top3_test.json").read_text())
    assert saved["R@1"] == m["R@1"] and before["R@1"] == m["before"]["R@1"] and before["system"] == "toy_top3"
    runs = [json.loads(x) for x in open(out / "run_test.jsonl")]
    lists = load_lists(data / "test.jsonl")
    for r, x in zip(runs, lists):  # a permutation of the same candidates, best first
        assert sorted(r["ranked"]) == sorted(x["candidates"]) and r["scores"] == sorted(r["scores"], reverse=True)
    # the same lists scored in full (no shared prefix) give the same ranking
    m2 = rerank_test.main(["--reranker-dir", str(tmp_path / "full" / "best"), "--data-dir", str(data),
                           "--out-dir", str(tmp_path / "test2"), "--retriever-name", "toy", "--no-shared-prefix"])
    assert [m2[k] for k in ("R@1", "R@3", "mean_rank")] == [m[k] for k in ("R@1", "R@3", "mean_rank")]


def test_make_demo_llama_is_a_seeded_left_padding_llama(tmp_path):
    mod = load_tool("make_demo_llama")
    texts = [caption(i) for i in range(30)] + ["a small red cube in the upper left"]
    for name in ("a", "b"):
        mod.make_demo_llama(texts, tmp_path / name, vocab_size=60, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    tok, lm = L.load_causal_lm(str(tmp_path / "a"))
    assert type(lm).__name__ == "LlamaForCausalLM" and tok.padding_side == "left"
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 3
    enc = tok(["a red cube", "a red cube on the table"], padding=True)
    assert enc["input_ids"][0][0] == tok.pad_token_id and enc["input_ids"][1][0] == tok.bos_token_id
    _, lm_b = L.load_causal_lm(str(tmp_path / "b"))
    assert all(torch.equal(p, q) for p, q in zip(lm.parameters(), lm_b.parameters()))
