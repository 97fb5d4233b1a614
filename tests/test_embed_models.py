"""The embedding model families (holly_hpc.embed): shapes, gradients, loss terms, the EMA codebook,
channel folding, input normalisation and a short training run. Small widths keep the file fast."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from holly_hpc.embed.decoder import ResNetDecoder, upsampling_plan
from holly_hpc.embed.models import (
    VAE,
    VQVAE,
    AutoEncoder,
    ChannelFoldingWrapper,
    EMAVectorQuantiser,
    normalise_per_channel,
    reconstruction_loss,
)
from holly_hpc.embed.resnet import BasicBlock, Bottleneck, ResNetEncoder

WIDTH = 4  # stage widths 4..32: enough to exercise every layer, cheap on a shared CPU


pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded_torch")


def blob_images(count: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """(count, channels, size, size) in [0, 1]: three Gaussian blobs of random place and width per image
    and channel, a stand-in for fluorescent spots."""
    g = torch.Generator().manual_seed(seed)
    centres = size * (0.2 + 0.6 * torch.rand(count, channels, 3, 2, generator=g))
    widths = 1.5 + 3 * torch.rand(count, channels, 3, 1, 1, generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    dy = (coords.view(size, 1) - centres[..., 0, None, None]) ** 2
    dx = (coords.view(1, size) - centres[..., 1, None, None]) ** 2
    images = torch.exp(-(dx + dy) / (2 * widths**2)).sum(dim=2)
    return images / images.amax(dim=(-2, -1), keepdim=True)


def folded(factory, **kwargs):
    return lambda channels, size: ChannelFoldingWrapper(
        functools.partial(factory, image_size=size, **kwargs), channels=channels, consistency_weight=0.1
    )


FAMILIES = {
    "ae": lambda c, s: AutoEncoder(18, c, s, latent_dim=8, width=WIDTH),
    "vae": lambda c, s: VAE(18, c, s, latent_dim=8, beta=2.0, width=WIDTH),
    "vqvae": lambda c, s: VQVAE(18, c, s, codebook_size=16, code_dim=4, grid=4, width=WIDTH),
    "folded-vae": folded(functools.partial(VAE, 18), latent_dim=8, width=WIDTH),
    "folded-vqvae": folded(functools.partial(VQVAE, 18), codebook_size=16, code_dim=4, grid=2, width=WIDTH),
}


def encoder_and_decoder(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    inner = getattr(model, "model", model)  # the shared model inside a ChannelFoldingWrapper
    return inner.encoder, inner.decoder


def grad_norm(module: torch.nn.Module) -> float:
    return float(sum(p.grad.norm() ** 2 for p in module.parameters()) ** 0.5)


# ----------------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.parametrize("depth, block, count", [(18, BasicBlock, 8), (34, BasicBlock, 16), (50, Bottleneck, 16)])
def test_encoder_layouts_and_any_input_size(depth, block, count):
    encoder = ResNetEncoder(depth, in_channels=3, width=WIDTH)
    assert sum(isinstance(m, block) for m in encoder.modules()) == count
    assert encoder.stride == 8 and encoder.out_channels == 8 * WIDTH * block.expansion
    for height, width in [(32, 32), (48, 48), (33, 57)]:
        features = encoder(torch.rand(2, 3, height, width))
        assert features.shape == (2, encoder.out_channels, -(-height // 8), -(-width // 8))


def test_projection_shortcut_only_when_the_shape_changes():
    assert isinstance(BasicBlock(8, 8).shortcut, torch.nn.Identity)
    assert isinstance(BasicBlock(8, 16).shortcut, torch.nn.Sequential)
    assert isinstance(BasicBlock(8, 8, stride=2).shortcut, torch.nn.Sequential)
    assert isinstance(Bottleneck(16, 4).shortcut, torch.nn.Identity)  # 4 planes x 4 = 16 channels


def test_encoder_rejects_unknown_depth():
    with pytest.raises(ValueError, match="depth"):
        ResNetEncoder(101, 1)


@pytest.mark.parametrize("size, plan", [(32, (4, 3)), (48, (3, 4)), (50, (4, 4)), (64, (4, 4)), (100, (4, 5))])
@pytest.mark.parametrize("channels", [1, 3])
def test_decoder_reaches_any_size(size, plan, channels):
    assert upsampling_plan(size) == plan
    decoder = ResNetDecoder(6, channels, size, seed_size=plan[0], width=WIDTH)
    assert decoder(torch.rand(2, 6, plan[0], plan[0])).shape == (2, channels, size, size)


# ----------------------------------------------------------------------------------------------------
# Every family


@pytest.mark.parametrize("size", [32, 48, 64])
@pytest.mark.parametrize("channels", [1, 2, 5])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shapes_finite_losses_and_gradients(family, channels, size):
    model = FAMILIES[family](channels, size)
    x = blob_images(3, channels, size)
    out = model(x)
    assert out["reconstruction"].shape == x.shape
    assert out["embedding"].shape == (3, model.embedding_dim)
    assert "recon" in out["loss_terms"] and set(model.loss_weights) <= set(out["loss_terms"])
    for name, term in out["loss_terms"].items():
        assert term.dim() == 0 and torch.isfinite(term), name
    loss = model.loss(x, out)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    encoder, decoder = encoder_and_decoder(model)
    assert grad_norm(encoder) > 0 and grad_norm(decoder) > 0


def test_folded_embedding_sizes():
    assert FAMILIES["folded-vae"](5, 32).embedding_dim == 5 * 8
    assert FAMILIES["folded-vqvae"](5, 32).embedding_dim == 5 * 4 * 2 * 2


@pytest.mark.parametrize("depth", [34, 50])
def test_deeper_backbones_fit_any_latent_size(depth):
    model = AutoEncoder(depth, 2, 32, latent_dim=3, width=WIDTH)
    out = model(torch.rand(2, 2, 32, 32))
    assert out["embedding"].shape == (2, 3) and out["reconstruction"].shape == (2, 2, 32, 32)


def test_models_reject_inputs_of_the_wrong_shape():
    model = AutoEncoder(18, 2, 32, latent_dim=4, width=WIDTH)
    with pytest.raises(ValueError, match=r"\(B, 2, 32, 32\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="single-channel"):
        ChannelFoldingWrapper(lambda in_channels: AutoEncoder(18, 2, 32, 4, width=WIDTH), channels=2)


# ----------------------------------------------------------------------------------------------------
# VAE


def test_beta_scales_the_kl_contribution():
    model = VAE(18, 1, 32, latent_dim=8, beta=1.0, width=WIDTH)
    x = blob_images(4, 1, 32)
    out = model(x)
    kl_nats = (-0.5 * (1 + out["logvar"] - out["mean"] ** 2 - out["logvar"].exp()).sum(1)).mean()
    torch.testing.assert_close(out["loss_terms"]["kl"], kl_nats / (32 * 32))
    assert out["loss_terms"]["kl"] > 0
    recon = reconstruction_loss(out["reconstruction"], x)
    contributions = {}
    for beta in (0.0, 1.0, 4.0):
        model.beta = beta
        contributions[beta] = model.loss(x, out) - recon
    torch.testing.assert_close(contributions[0.0], torch.tensor(0.0))
    torch.testing.assert_close(contributions[1.0], out["loss_terms"]["kl"])
    torch.testing.assert_close(contributions[4.0], 4 * contributions[1.0])
    assert VAE(18, 1, 32, 8, beta=4.0, width=WIDTH).loss_weights == {"kl": 4.0}


def test_vae_embedding_is_the_posterior_mean():
    model = VAE(18, 2, 32, latent_dim=8, width=WIDTH)
    x = blob_images(4, 2, 32)
    out = model(x)  # training mode: z is a sample, the embedding is still the mean
    assert torch.equal(out["embedding"], out["mean"]) and not torch.allclose(out["z"], out["mean"])
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
        mean = model.to_posterior(model.encoder(x)).chunk(2, dim=1)[0]
    torch.testing.assert_close(first["embedding"], mean)
    assert torch.equal(first["z"], first["mean"])
    assert torch.equal(first["reconstruction"], second["reconstruction"])  # eval decodes the mean


# ----------------------------------------------------------------------------------------------------
# VQ-VAE and its EMA codebook


def quantiser_with(codebook: torch.Tensor, decay: float = 0.5) -> EMAVectorQuantiser:
    """A quantiser whose codes are alive and placed at `codebook`."""
    quantiser = EMAVectorQuantiser(codebook.shape[0], codebook.shape[1], decay=decay, epsilon=1e-9)
    quantiser.codebook.copy_(codebook)
    quantiser.embed_sum.copy_(codebook)
    quantiser.cluster_size.fill_(1.0)
    return quantiser


def test_ema_update_follows_the_formula_in_training_only():
    quantiser = quantiser_with(torch.tensor([[0.0], [10.0]]), decay=0.5)
    z = torch.tensor([[1.0], [2.0], [9.0]])  # codes 0, 0, 1
    quantiser.eval()
    before = {name: b.clone() for name, b in quantiser.named_buffers()}
    out = quantiser(z)
    assert out["codes"].tolist() == [0, 0, 1]
    assert all(torch.equal(before[name], b) for name, b in quantiser.named_buffers())
    quantiser.train()
    quantiser(z)
    torch.testing.assert_close(quantiser.cluster_size, torch.tensor([1.5, 1.0]))  # 0.5*1 + 0.5*[2, 1]
    torch.testing.assert_close(quantiser.embed_sum, torch.tensor([[1.5], [9.5]]))  # 0.5*[0, 10] + 0.5*[3, 9]
    torch.testing.assert_close(quantiser.codebook, torch.tensor([[1.0], [9.5]]))


def test_vqvae_codebook_moves_by_ema_not_gradients():
    model = VQVAE(18, 1, 32, codebook_size=16, code_dim=4, width=WIDTH)
    assert all(p is not model.quantiser.codebook for p in model.parameters())
    x = blob_images(4, 1, 32)
    model(x)  # the first training step initialises the codebook from the batch
    model.eval()
    before = model.quantiser.codebook.clone()
    model.loss(x, model(x)).backward()
    assert torch.equal(model.quantiser.codebook, before) and model.quantiser.codebook.grad is None
    model.train()
    model(x)
    assert not torch.equal(model.quantiser.codebook, before)


def test_straight_through_gradient_and_commitment():
    quantiser = quantiser_with(torch.tensor([[0.0, 0.0], [4.0, 4.0]])).eval()
    z = torch.tensor([[0.5, -0.5], [3.0, 5.0]], requires_grad=True)
    out = quantiser(z)
    torch.testing.assert_close(out["quantised"], torch.tensor([[0.0, 0.0], [4.0, 4.0]]))
    torch.testing.assert_close(out["commitment"], torch.tensor((0.25 + 0.25 + 1 + 1) / 4))
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (out["quantised"] * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # the decoder's gradient passes to the encoder unchanged


def test_usage_statistics():
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    quantiser = quantiser_with(points).eval()
    stats = quantiser(points.repeat(3, 1))["stats"]
    assert stats["perplexity"].item() == pytest.approx(4.0) and stats["codes_used"].item() == 4
    stats = quantiser(points[:1].repeat(5, 1))["stats"]
    assert stats["perplexity"].item() == pytest.approx(1.0) and stats["codes_used"].item() == 1
    assert stats["dead_codes"].item() == 0
    quantiser.cluster_size[2] = 0.0
    assert quantiser(points)["stats"]["dead_codes"].item() == 1


def test_first_training_batch_initialises_every_code_from_data():
    quantiser = EMAVectorQuantiser(8, 3)
    z = 5 + 0.01 * torch.randn(32, 3)
    quantiser.eval()
    assert quantiser(z)["stats"]["dead_codes"].item() == 8  # nothing trained yet
    quantiser.train()
    assert quantiser(z)["stats"]["dead_codes"].item() == 8
    assert (quantiser.codebook - 5).abs().max() < 0.1


def test_dead_codes_are_reinitialised_from_the_batch():
    generator = torch.Generator().manual_seed(1)
    quantiser = EMAVectorQuantiser(16, 3, decay=0.5, dead_code_threshold=1e-3, generator=generator)
    quantiser(torch.randn(64, 3))
    far = torch.arange(4)  # move four codes where no encoder output ever lands: guaranteed dead
    quantiser.codebook[far] = 1e3
    quantiser.embed_sum[far] = 1e3 * quantiser.cluster_size[far, None]
    dead_counts = []
    for _ in range(25):
        out = quantiser(torch.randn(64, 3))
        dead_counts.append(out["stats"]["dead_codes"].item())
        still_far = far[quantiser.codebook[far].abs().amax(dim=1) > 100]
        assert not torch.isin(out["codes"], still_far).any()  # dead until restarted, not slowly dragged back
    assert sum(dead_counts) >= 4  # each far code was restarted (they die at different steps)
    assert quantiser.codebook[far].abs().max() < 10  # back among the data


def test_reinitialisation_is_reproducible_with_a_generator():
    def run(seed):
        torch.manual_seed(0)
        quantiser = EMAVectorQuantiser(8, 2, generator=torch.Generator().manual_seed(seed))
        quantiser(torch.randn(20, 2))
        return quantiser.codebook.clone()

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_vqvae_uses_several_codes_per_image():
    torch.manual_seed(0)
    x = blob_images(16, 1, 32)
    model = VQVAE(18, 1, 32, codebook_size=32, code_dim=4, grid=4, width=8, generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        optimiser.zero_grad()
        out = model(x)
        model.loss(x, out).backward()
        optimiser.step()
    # The last training step's codes: after 5 steps BatchNorm's running statistics (eval mode) are not
    # yet those of the data, which would say more about BatchNorm than about the codebook.
    codes = out["codes"].flatten(1)  # (16 images, 16 cells)
    distinct_per_image = torch.nn.functional.one_hot(codes, 32).amax(dim=1).sum(dim=1)
    assert (distinct_per_image > 1).all(), distinct_per_image
    assert out["stats"]["codes_used"] > 4 and out["stats"]["perplexity"] > 2
    assert len(torch.unique(out["embedding"], dim=0)) == 16  # every image has its own embedding


# ----------------------------------------------------------------------------------------------------
# Channel folding


def test_channel_folding_shares_one_model_and_concatenates_embeddings():
    model = ChannelFoldingWrapper(
        functools.partial(AutoEncoder, 18, image_size=32, latent_dim=8, width=WIDTH), channels=3, consistency_weight=0.5
    ).eval()
    x = blob_images(4, 3, 32)
    with torch.no_grad():
        out = model(x)
        per_channel = [model.model(x[:, c : c + 1])["embedding"] for c in range(3)]
    assert out["embedding"].shape == (4, 3 * 8) and out["channel_embeddings"].shape == (4, 3, 8)
    torch.testing.assert_close(out["embedding"], torch.cat(per_channel, dim=1))
    assert out["loss_terms"]["consistency"] > 0
    recon = reconstruction_loss(out["reconstruction"], x)
    torch.testing.assert_close(model.loss(x, out), recon + 0.5 * out["loss_terms"]["consistency"])


@pytest.mark.parametrize("family", ["folded-vae", "folded-vqvae"])
def test_consistency_is_zero_when_channels_are_identical(family):
    model = FAMILIES[family](4, 32)
    one_channel = blob_images(3, 1, 32)
    out = model(one_channel.expand(3, 4, 32, 32).contiguous())
    torch.testing.assert_close(out["loss_terms"]["consistency"], torch.tensor(0.0))
    different = model(blob_images(3, 4, 32))
    assert different["loss_terms"]["consistency"] > 0


# ----------------------------------------------------------------------------------------------------
# Input normalisation


def test_normalise_per_channel_maps_uint16_percentiles_to_zero_and_one():
    rng = np.random.default_rng(0)
    offsets = np.array([100, 5000, 40000]).reshape(1, 3, 1, 1)
    raw = (rng.gamma(2.0, 600.0, size=(2, 3, 40, 40)) + offsets).clip(0, 65535).astype(np.uint16)
    out = normalise_per_channel(torch.from_numpy(raw), low=1.0, high=99.0)
    assert out.dtype == torch.float32 and out.min() == 0 and out.max() == 1
    flat = raw.reshape(2, 3, -1).astype(np.float64)
    lo, hi = np.percentile(flat, 1.0, axis=-1), np.percentile(flat, 99.0, axis=-1)
    expected = np.clip((raw - lo[..., None, None]) / (hi - lo)[..., None, None], 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    below = (out == 0).float().mean(dim=(-2, -1))  # about 1% of each image and channel sits at 0
    assert ((below >= 0.01) & (below < 0.02)).all()
    as_float = normalise_per_channel(torch.from_numpy(raw.astype(np.float32)), low=1.0, high=99.0)
    torch.testing.assert_close(as_float, out)


def test_normalise_per_channel_edge_cases():
    x = torch.rand(1, 2, 16, 16)
    full = normalise_per_channel(x, low=0.0, high=100.0)
    torch.testing.assert_close(full.amin(dim=(-2, -1)), torch.zeros(1, 2))
    torch.testing.assert_close(full.amax(dim=(-2, -1)), torch.ones(1, 2))
    assert torch.equal(normalise_per_channel(torch.full((1, 1, 8, 8), 7, dtype=torch.uint16)), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError):
        normalise_per_channel(x, low=60, high=40)


# ----------------------------------------------------------------------------------------------------
# Training


def test_a_short_training_run_reduces_the_reconstruction_loss():
    torch.manual_seed(0)
    x = blob_images(16, 1, 32, seed=3)
    model = AutoEncoder(18, 1, 32, latent_dim=16, width=8)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = model.loss(x, model(x))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    final = sum(losses[-3:]) / 3
    assert final < 0.7 * losses[0], losses
    # ...and it is reconstructing each image, not the average one (about 0.5 x that baseline here).
    mean_image_error = reconstruction_loss(x.mean(dim=0, keepdim=True).expand_as(x), x).item()
    assert final < 0.7 * mean_image_error, (final, mean_image_error)
