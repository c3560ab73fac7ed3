"""VokenVocab: token names, never-split tokens, embedding initialisation, code <-> id mapping."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from avg.retriever.vocab import VokenVocab
from avg.core.io import InputError
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
make_demo_t5 = load_tool("make_demo_t5")

TEXTS = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("cube", "ball") for p in ("left", "right")]


def tiny(d_model=16, tie=True, seed=0):
    tok = make_demo_t5.train_tokenizer(TEXTS, vocab_size=40)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return tok, T5ForConditionalGeneration(cfg)


def mean_norm(w):
    return float(w.norm(dim=1).mean())


def test_token_names_per_layout():
    shared = VokenVocab(num_levels=3, codebook_size=4, shared_codebook=True)
    assert shared.tokens() == [f"<v_{k}>" for k in range(4)]
    assert shared.code_len == 3 and all(p == shared.tokens() for p in shared.position_tokens())
    per = VokenVocab(num_levels=2, codebook_size=3, shared_codebook=False, disambiguation=True, disambiguation_size=2)
    assert per.code_len == 3
    assert per.position_tokens() == [["<v0_0>", "<v0_1>", "<v0_2>"], ["<v1_0>", "<v1_1>", "<v1_2>"], ["<d_0>", "<d_1>"]]
    meta = {"num_levels": 2, "codebook_size": 3, "shared_codebook": False, "code_len": 2, "disambiguation": True,
            "disambiguation_size": 2}
    with pytest.raises(InputError, match="code_len"):
        VokenVocab.from_meta(meta)


def test_tokens_added_and_never_split():
    tok, model = tiny()
    n0 = len(tok)
    vocab = VokenVocab(num_levels=2, codebook_size=5, shared_codebook=False, disambiguation=True, disambiguation_size=3)
    vocab.add_to(tok, model, init="random", seed=0)
    assert len(tok) == n0 + 2 * 5 + 3
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    pieces = tok.tokenize("a red<v0_4><v1_0> cube <d_2>")
    assert "<v0_4>" in pieces and "<v1_0>" in pieces and "<d_2>" in pieces
    ids = tok("<v0_4><v1_0><d_2>", add_special_tokens=False)["input_ids"]
    assert ids == vocab.code_to_token_ids([[4, 0, 2]])[0].tolist()
    # adding again (e.g. to a reloaded tokenizer) adds nothing and keeps the ids
    before = [list(p) for p in vocab.position_token_ids]
    vocab.add_to(tok, model, init="random", seed=0)
    assert len(tok) == n0 + 13 and vocab.position_token_ids == before


def test_codebook_copied_and_scaled_when_dims_match():
    tok, model = tiny(d_model=16)
    n_real = len(tok)
    target = mean_norm(model.get_input_embeddings().weight[:n_real].detach())
    rng = np.random.default_rng(0)
    cb = rng.normal(size=(1, 6, 16)).astype(np.float32) * rng.uniform(0.5, 3, size=(1, 6, 1)).astype(np.float32)
    vocab = VokenVocab(num_levels=2, codebook_size=6, shared_codebook=True).add_to(tok, model, cb, seed=0)
    rows = model.get_input_embeddings().weight.detach()[vocab.position_id_tensor(0)]
    c = torch.from_numpy(cb[0])
    scale = rows.norm(dim=1) / c.norm(dim=1)
    assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5)  # one common factor: a copy, rescaled
    assert torch.allclose(rows, c * scale[0], atol=1e-5)
    assert mean_norm(rows) == pytest.approx(target, rel=1e-5)


def test_codebook_projected_when_dims_differ():
    def run(seed):
        tok, model = tiny(d_model=16)
        target = mean_norm(model.get_input_embeddings().weight[: len(tok)].detach())
        cb = np.random.default_rng(1).normal(size=(2, 12, 4)).astype(np.float32)  # per-level, latent 4 -> 16
        vocab = VokenVocab(num_levels=2, codebook_size=12, shared_codebook=False, disambiguation=True,
                           disambiguation_size=3)
        vocab.add_to(tok, model, cb, seed=seed)
        return target, cb, vocab, model.get_input_embeddings().weight.detach()

    target, cb, vocab, w = run(0)
    ids = torch.tensor(vocab.position_token_ids[0] + vocab.position_token_ids[1])
    rows = w[ids]
    c = torch.from_numpy(cb.reshape(24, 4))
    # rows = s * C @ P for one fixed linear map: least squares reproduces them exactly
    assert torch.allclose(c @ torch.linalg.lstsq(c, rows).solution, rows, atol=1e-4)
    assert mean_norm(rows) == pytest.approx(target, rel=1e-4)
    # disambiguation rows: random (not in the codebook's span), same mean norm
    d_rows = w[torch.tensor(vocab.position_token_ids[2])]
    assert mean_norm(d_rows) == pytest.approx(target, rel=1e-4)
    # the projection is fixed by the seed
    assert torch.equal(run(0)[3][ids], rows)
    assert not torch.allclose(run(1)[3][ids], rows)


def test_random_init_ablation_ignores_codebook():
    tok, model = tiny(d_model=16)
    target = mean_norm(model.get_input_embeddings().weight[: len(tok)].detach())
    cb = np.random.default_rng(0).normal(size=(1, 24, 4)).astype(np.float32)
    vocab = VokenVocab(num_levels=2, codebook_size=24).add_to(tok, model, cb, init="random", seed=0)
    rows = model.get_input_embeddings().weight.detach()[vocab.position_id_tensor(0)]
    c = torch.from_numpy(cb[0])
    fit = c @ torch.linalg.lstsq(c, rows).solution
    assert (fit - rows).norm() / rows.norm() > 0.5  # not a linear image of the codebook
    assert mean_norm(rows) == pytest.approx(target, rel=1e-5)


def test_untied_output_rows_initialised_at_head_scale():
    tok, model = tiny(d_model=16, tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(7.0)  # a head with a different scale than the input embeddings
    n_real = len(tok)
    head_norm = mean_norm(model.lm_head.weight[:n_real].detach())
    cb = np.random.default_rng(0).normal(size=(1, 5, 16)).astype(np.float32)
    vocab = VokenVocab(num_levels=1, codebook_size=5).add_to(tok, model, cb, seed=0)
    ids = vocab.position_id_tensor(0)
    head_rows = model.lm_head.weight.detach()[ids]
    assert mean_norm(head_rows) == pytest.approx(head_norm, rel=1e-5)
    assert torch.allclose(head_rows / head_rows.norm(dim=1, keepdim=True),
                          torch.from_numpy(cb[0]) / torch.from_numpy(cb[0]).norm(dim=1, keepdim=True), atol=1e-5)


def test_code_token_round_trip_and_position_check(tmp_path):
    tok, model = tiny()
    vocab = VokenVocab(num_levels=3, codebook_size=7, shared_codebook=False, disambiguation=True,
                       disambiguation_size=4).add_to(tok, model, init="random")
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, [7, 7, 7, 4], size=(50, 4)))
    ids = vocab.code_to_token_ids(codes)
    assert torch.equal(vocab.token_ids_to_codes(ids), codes)
    swapped = ids[:, [1, 0, 2, 3]]  # a level-1 token at position 0 is not a position-0 voken
    assert (vocab.token_ids_to_codes(swapped)[:, :2] == -1).all()
    with pytest.raises(ValueError):
        vocab.code_to_token_ids([[7, 0, 0, 0]])
    # save / reload: the tokenizer keeps the tokens, VokenVocab.load binds the same ids
    tok.save_pretrained(tmp_path)
    from avg.core.io import write_json
    write_json(vocab.to_dict(), tmp_path / "voken_vocab.json")
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    again = VokenVocab.load(tmp_path, tok2)
    assert again.position_token_ids == vocab.position_token_ids
    assert tok2.tokenize("<v2_6><d_3>") == ["<v2_6>", "<d_3>"]
