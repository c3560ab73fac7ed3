"""RQ-VAE model: the vectorised quantizer and losses against a naive per-row loop (eqs. 2-6)."""
import pytest
import torch

from avg.models.rqvae import RQVAE, RQVAEConfig
from avg.core.io import InputError


def small_model(shared=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(input_dim=12, hidden_dims=[16], latent_dim=5, num_levels=3, codebook_size=7, shared_codebook=shared)
    cfg.update(kw)
    return RQVAE(RQVAEConfig(**cfg))


def naive_quantize(z, books, shared, num_levels):
    """Row by row, level by level, code by code: eq. 2 written as plainly as possible."""
    codes, residuals, partial = [], [], []
    for row in z.tolist():
        r = list(row)
        acc = [0.0] * len(r)
        rc, rr, rp = [], [], []
        for level in range(num_levels):
            book = books[0 if shared else level]
            dists = [sum((a - b) ** 2 for a, b in zip(r, e)) for e in book]
            k = min(range(len(dists)), key=lambda i: dists[i])
            rc.append(k)
            rr.append(list(r))
            acc = [a + b for a, b in zip(acc, book[k])]
            rp.append(list(acc))
            r = [a - b for a, b in zip(r, book[k])]
        codes.append(rc)
        residuals.append(rr)
        partial.append(rp)
    return torch.tensor(codes), torch.tensor(residuals), torch.tensor(partial)



def sqnorm_mean(a, b):
    rows = [sum((x - y) ** 2 for x, y in zip(ra, rb)) for ra, rb in zip(a.tolist(), b.tolist())]
    return sum(rows) / len(rows)


@pytest.mark.parametrize("shared", [True, False])
def test_quantizer_and_losses_match_naive_loop(shared):
    model = small_model(shared)
    x, t = torch.randn(9, 12), torch.randn(9, 12)
    out = model(x, text=t)
    z = model.encoder(x).detach()
    books = model.codebooks.detach().tolist()
    codes, residuals, partial = naive_quantize(z, books, shared, 3)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.residuals, residuals, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.partial_sums.detach(), partial, rtol=1e-5, atol=1e-5)
    dec = model.decoder(partial[:, -1])
    torch.testing.assert_close(out.decoded.detach(), dec.detach(), rtol=1e-5, atol=1e-5)
    assert out.recon_loss.item() == pytest.approx(sqnorm_mean(dec, x), rel=1e-5)  # eq. 3
    commit = sum(sqnorm_mean(z, partial[:, d]) for d in range(3))  # eq. 4 (latent space)
    assert out.commit_loss.item() == pytest.approx(commit, rel=1e-5)
    vok = torch.stack([torch.tensor(books[0 if shared else d])[codes[:, d]] for d in range(3)], 1)
    codebook = sum(sqnorm_mean(residuals[:, d], vok[:, d]) for d in range(3))
    assert out.codebook_loss.item() == pytest.approx(codebook, rel=1e-5)
    assert out.align_loss.item() == pytest.approx(sqnorm_mean(dec, t), rel=1e-5)  # eq. 5
    c = model.config
    total = c.recon_weight * out.recon_loss + c.commit_weight * commit + c.codebook_weight * codebook + c.align_weight * out.align_loss
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)  # eq. 6
    assert torch.equal(model.encode(x), codes)
    _, err = model.encode_with_error(x)
    torch.testing.assert_close(err, (z - partial[:, -1]).norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_shared_vs_per_level_books():
    shared, per_level = small_model(True), small_model(False)
    assert shared.codebooks.shape == (1, 7, 5) and per_level.codebooks.shape == (3, 7, 5)
    assert shared.codebook(0) is not None and torch.equal(shared.codebook(0), shared.codebook(2))
    assert not torch.equal(per_level.codebook(0), per_level.codebook(2))
    with pytest.raises(IndexError):
        shared.codebook(3)


def test_straight_through_gradient_reaches_encoder():
    model = small_model(recon_weight=1.0, commit_weight=0.0, codebook_weight=0.0, align_weight=0.0)
    x = torch.randn(6, 12)
    out = model(x)
    out.loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0  # only the STE connects recon to it
    assert model.decoder[0].weight.grad.abs().sum() > 0
    assert model.codebooks.grad is None or model.codebooks.grad.abs().sum() == 0
    # the gradient at z equals the gradient at the decoder input (identity backward of the STE)
    zq = out.partial_sums[:, -1].detach().requires_grad_()
    g_zq = torch.autograd.grad(((model.decoder(zq) - x).pow(2).sum(-1).mean()), zq)[0]
    z = model.encoder(x)
    z.retain_grad()
    zst = z + (out.partial_sums[:, -1].detach() - z).detach()
    ((model.decoder(zst) - x).pow(2).sum(-1).mean()).backward()
    torch.testing.assert_close(z.grad, g_zq)


def test_codebook_and_commit_gradients_go_where_they_should():
    model = small_model(recon_weight=0.0, commit_weight=0.0, codebook_weight=1.0, align_weight=0.0)
    model(torch.randn(6, 12)).loss.backward()
    assert model.codebooks.grad.abs().sum() > 0 and model.encoder[0].weight.grad.abs().sum() == 0
    model = small_model(recon_weight=0.0, commit_weight=1.0, codebook_weight=0.0, align_weight=0.0)
    model(torch.randn(6, 12)).loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert model.codebooks.grad is None or model.codebooks.grad.abs().sum() == 0


def test_align_mask_ignores_rows_without_caption():
    model = small_model()
    x, t = torch.randn(4, 12), torch.randn(4, 12)
    mask = torch.tensor([True, False, True, False])
    t2 = t.clone()
    t2[~mask] = 1e3  # garbage where there is no caption must not matter
    a = model(x, text=t, text_mask=mask).align_loss
    b = model(x, text=t2, text_mask=mask).align_loss
    assert a.item() == pytest.approx(b.item())
    assert a.item() == pytest.approx(sqnorm_mean(model(x).decoded[mask], t[mask]), rel=1e-5)


def test_ema_update_moves_codes_to_assigned_mean():
    model = small_model(codebook_update="ema", ema_decay=0.0, num_levels=1, codebook_size=4)
    assert not model.codebooks.requires_grad
    x = torch.randn(32, 12)
    model.train()
    out = model(x)
    z = out.z.detach()
    for k in out.codes[:, 0].unique():
        sel = out.codes[:, 0] == k
        torch.testing.assert_close(model.codebooks[0, k], z[sel].mean(0), rtol=1e-3, atol=1e-4)
    assert out.codebook_loss.item() == 0.0


def test_save_and_load_roundtrip(tmp_path):
    model = small_model(shared=False).eval()
    x = torch.randn(5, 12)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = RQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded(x).decoded, model(x).decoded)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="model.safetensors"):
        RQVAE.from_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match="config.json"):
        RQVAE.from_pretrained(tmp_path / "nowhere")
