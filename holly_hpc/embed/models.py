"""Embedding model families: AutoEncoder, VAE (β-VAE), VQVAE (EMA codebook over a spatial grid), the
ChannelFoldingWrapper that shares one single-channel model across channels, and normalise_per_channel.

Every model is an EmbeddingModel: `forward(x)` takes images (B, in_channels, image_size, image_size)
normalised to about [0, 1] and returns a dict with at least

    reconstruction  (B, in_channels, image_size, image_size)
    embedding       (B, embedding_dim), what downstream analysis uses (the latent the decoder starts from)
    features        (B, feature_dim), the encoder's feature map averaged over space: the ResNet's own
                    image descriptor, robust to where the cell sits (feature_dim = 8 x width for depths 18
                    and 34, 32 x width for 50; x channels when folded)
    loss_terms      {name: scalar tensor}: "recon" plus the family's other terms, unweighted
    stats           {name: detached scalar tensor}: diagnostics that are not part of the loss

and `loss(x, out)` = reconstruction_loss(out["reconstruction"], x) + Σ loss_weights[name] × loss_terms[name].
x there is the reconstruction target: usually the input, but a different one (a clean image for a
denoising model) works too, which is why the loss takes it rather than reusing loss_terms["recon"].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.distributed import all_sum, broadcast
from .decoder import LatentExpansion, ResNetDecoder, upsampling_plan
from .resnet import ResNetEncoder

# ----------------------------------------------------------------------------------------------------
# Input normalisation


def percentiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Percentiles q (in [0, 100]) along the last dim of values (..., N) -> (..., len(q)).

    Linear interpolation between order statistics, like numpy.percentile's default. Written with a sort
    rather than torch.quantile, which refuses inputs of more than 2^24 elements (a batch of large crops).
    """
    ordered = values.sort(dim=-1).values
    position = q.to(ordered) / 100 * (values.shape[-1] - 1)
    below = position.floor().long()
    above = (below + 1).clamp_max(values.shape[-1] - 1)
    shape = (*ordered.shape[:-1], len(q))
    low_values = ordered.gather(-1, below.expand(shape))
    high_values = ordered.gather(-1, above.expand(shape))
    return low_values + (position - below) * (high_values - low_values)


def normalise_per_channel(x: torch.Tensor, low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """Percentile normalisation of each image and channel of x (B, C, H, W) (any leading dims) to [0, 1].

    The low-th percentile of each (image, channel) maps to 0 and the high-th to 1, then values are
    clipped to [0, 1]: robust to hot pixels and to the arbitrary offset and gain of 16-bit cameras, and
    every channel ends on the same scale whatever its brightness. Integer inputs (uint16 included) are
    converted to float32, which holds every 16-bit value exactly; float inputs keep their dtype. A
    constant image (high percentile == low) maps to 0.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    values = x if x.is_floating_point() else x.to(torch.float32)
    bounds = percentiles(values.flatten(-2), torch.tensor([low, high]))
    return scale_between(values, bounds[..., :1, None], bounds[..., 1:, None])


def scale_between(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """lo maps to 0 and hi to 1 (broadcast over values), clipped to [0, 1]; a zero span maps to 0."""
    span = (hi - lo).clamp_min(torch.finfo(values.dtype).tiny)
    return ((values - lo) / span).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# The shared contract


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel and channel: independent of image size and channel count."""
    return F.mse_loss(reconstruction, target)


class EmbeddingModel(nn.Module):
    """Base of every family: the input check, the loss weights and the weighted loss."""

    in_channels: int
    image_size: int
    embedding_dim: int

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss term other than "recon" (whose weight is 1)."""
        return {}

    @property
    def feature_dim(self) -> int:
        """Size of out["features"]: the encoder's channel count."""
        return self.encoder.out_channels

    def loss(self, x: torch.Tensor, out: dict) -> torch.Tensor:
        total = reconstruction_loss(out["reconstruction"], x)
        for name, weight in self.loss_weights.items():
            total = total + weight * out["loss_terms"][name]
        return total

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images (B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {tuple(x.shape)}"
            )


def pooled_linear(in_features: int, out_features: int) -> nn.Sequential:
    """Feature map -> vector: global average pooling then a linear map, so any backbone (any channel
    count, any map size) fits any latent size."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, out_features))


def latent_decoder(latent_dim: int, out_channels: int, image_size: int, width: int) -> nn.Sequential:
    """Latent vector -> image: expansion to a small seed grid, then the ResNet decoder."""
    seed_size, _ = upsampling_plan(image_size)
    return nn.Sequential(
        LatentExpansion(latent_dim, 8 * width, seed_size),
        ResNetDecoder(8 * width, out_channels, image_size, seed_size, width),
    )


# ----------------------------------------------------------------------------------------------------
# AutoEncoder and VAE


class AutoEncoder(EmbeddingModel):
    """ResNet encoder -> global average pool + linear -> latent (the embedding) -> decoder."""

    def __init__(self, depth: int, in_channels: int, image_size: int, latent_dim: int, width: int = 64):
        super().__init__()
        self.in_channels, self.image_size, self.embedding_dim = in_channels, image_size, latent_dim
        self.encoder = ResNetEncoder(depth, in_channels, width)
        self.to_latent = pooled_linear(self.encoder.out_channels, latent_dim)
        self.decoder = latent_decoder(latent_dim, in_channels, image_size, width)

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        features = self.encoder(x)
        z = self.to_latent(features)
        reconstruction = self.decoder(z)
        return {
            "reconstruction": reconstruction,
            "embedding": z,
            "features": features.mean((2, 3)),
            "loss_terms": {"recon": reconstruction_loss(reconstruction, x)},
            "stats": {},
        }


LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32 early in training


class VAE(EmbeddingModel):
    """Gaussian VAE; beta != 1 makes it a β-VAE (Higgins et al. 2017).

    The loss is the negative ELBO per input element, recon + beta × kl, with
      recon = mean squared error per element (a Gaussian decoder of fixed variance 1/2, constants dropped),
      kl    = KL(q(z|x) || N(0, I)) in nats per image, averaged over the batch, divided by the number of
              elements per image (C × H × W),
    so that beta = 1 is the true ELBO whatever the image size, and beta really weighs the KL against the
    reconstruction. stats["kl_nats"] is the KL per image, the readable figure.

    Training mode samples z by reparameterisation; eval mode decodes the mean (deterministic). The
    embedding is always the posterior mean.
    """

    def __init__(
        self, depth: int, in_channels: int, image_size: int, latent_dim: int, beta: float = 1.0, width: int = 64
    ):
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.in_channels, self.image_size, self.embedding_dim = in_channels, image_size, latent_dim
        self.beta = float(beta)
        self.encoder = ResNetEncoder(depth, in_channels, width)
        self.to_posterior = pooled_linear(self.encoder.out_channels, 2 * latent_dim)
        self.decoder = latent_decoder(latent_dim, in_channels, image_size, width)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"kl": self.beta}

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        features = self.encoder(x)
        mean, logvar = self.to_posterior(features).chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        reconstruction = self.decoder(z)
        kl_nats = (-0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(dim=1)).mean()
        elements = x[0].numel()
        return {
            "reconstruction": reconstruction,
            "embedding": mean,
            "features": features.mean((2, 3)),
            "mean": mean,
            "logvar": logvar,
            "z": z,
            "loss_terms": {"recon": reconstruction_loss(reconstruction, x), "kl": kl_nats / elements},
            "stats": {"kl_nats": kl_nats.detach()},
        }


# ----------------------------------------------------------------------------------------------------
# VQ-VAE


class EMAVectorQuantiser(nn.Module):
    """Nearest-code quantisation of vectors (N, code_dim) with a codebook learnt by exponential moving
    averages (van den Oord et al. 2017, appendix; Razavi et al. 2019), not by gradients.

    The codebook is a buffer. In training mode only, each forward
      1. re-initialises dead codes (EMA cluster size < dead_code_threshold: unused for a while; with
         decay 0.99 and threshold 1e-3, a code used about once per batch dies after about 700 unused
         steps) to encoder outputs of the current batch, drawn without replacement when the batch has
         enough (Jukebox-style restarts). All codes start dead, so the first training batch initialises
         the whole codebook from data;
      2. assigns every vector to its nearest code;
      3. updates cluster sizes and per-code sums with the decay, and sets each code to sum / size with
         Laplace smoothing of the sizes (no division by zero for rarely used codes).
    Eval mode changes nothing. Under torch.distributed the counts and sums are all-reduced and the
    re-initialised codebook is broadcast from rank 0, so every process keeps the same codebook.

    Random draws use `generator` when given (a CPU torch.Generator: indices are drawn on the CPU and moved
    to the data's device; its state is not in state_dict, checkpoint it yourself) else the global RNG of
    the data's device (which the runtime's checkpoints save). Nothing here reads a GPU value back (dead
    codes are replaced through a mask, with candidates drawn every step; counts use index_add, not
    bincount, which syncs on CUDA), so a training step never waits on the GPU.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        dead_code_threshold: float = 1e-3,
        epsilon: float = 1e-5,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if codebook_size < 2 or code_dim < 1:
            raise ValueError(f"need codebook_size >= 2 and code_dim >= 1, got {codebook_size}, {code_dim}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.decay, self.dead_code_threshold, self.epsilon = decay, dead_code_threshold, epsilon
        self.generator = generator
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # zero: every code starts dead
        self.register_buffer("embed_sum", self.codebook.clone())

    def forward(self, z: torch.Tensor) -> dict:
        """z (N, code_dim) -> {quantised (N, code_dim) with straight-through gradients to z, codes (N,),
        commitment (scalar), stats {perplexity, codes_used, dead_codes}}."""
        with torch.autocast(device_type=z.device.type, enabled=False):  # distances need float32
            z32 = z.float()
            dead = self.cluster_size < self.dead_code_threshold
            if self.training:
                self.reinitialise(dead, z32.detach())
            codes = self.nearest_codes(z32.detach())
            quantised = F.embedding(codes, self.codebook)
            ones = torch.ones_like(codes, dtype=torch.float32)
            counts = torch.zeros(self.codebook_size, device=z.device).index_add_(0, codes, ones)
            if self.training:
                self.update_ema(z32.detach(), codes, counts)
            commitment = F.mse_loss(z32, quantised)
            straight_through = z32 + (quantised - z32).detach()
        probabilities = counts / counts.sum()
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
        stats = {
            "perplexity": entropy.exp(),
            "codes_used": (counts > 0).sum().float(),
            "dead_codes": dead.sum().float(),
        }
        return {"quantised": straight_through.to(z.dtype), "codes": codes, "commitment": commitment, "stats": stats}

    @torch.no_grad()
    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        return distances.argmin(dim=1)

    @torch.no_grad()
    def draw_rows(self, z: torch.Tensor, count: int) -> torch.Tensor:
        """count rows of z at random, without replacement when z has enough rows."""
        device = "cpu" if self.generator is not None else z.device
        if z.shape[0] >= count:
            index = torch.randperm(z.shape[0], generator=self.generator, device=device)[:count]
        else:
            index = torch.randint(z.shape[0], (count,), generator=self.generator, device=device)
        return z[index.to(z.device)]

    @torch.no_grad()
    def reinitialise(self, dead: torch.Tensor, z: torch.Tensor) -> None:
        candidates = self.draw_rows(z, self.codebook_size)
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        # A restarted code counts as seen once at its new place: its EMA starts from there.
        self.embed_sum.copy_(torch.where(dead[:, None], candidates, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
        # In DDP every process restarts codes from its own batch: rank 0's choice is everyone's.
        broadcast(self.codebook, src=0)
        broadcast(self.embed_sum, src=0)

    @torch.no_grad()
    def update_ema(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)
        # The global batch's statistics, or the processes' codebooks drift apart.
        counts, sums = all_sum(counts.clone()), all_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])


class VQVAE(EmbeddingModel):
    """VQ-VAE over a spatial grid of codes.

    The encoder's feature map is pooled adaptively to grid x grid cells, each cell projected to code_dim
    and quantised by an EMA codebook; the decoder starts from the quantised grid. One code per image would
    allow only codebook_size distinct images; a grid allows codebook_size^(grid²) and keeps layout.

    Loss: recon + commitment_weight × commitment, commitment = ||z_e - sg(e)||² per element (the codebook
    gets no gradient: the EMA moves it). stats: perplexity of the batch's code use, codes_used in the
    batch, dead_codes (re-initialised this step in training; currently dead in eval).

    The embedding is the flattened quantised grid (B, code_dim × grid²), channel-major: exactly what the
    decoder sees, so no information is lost and distinct code layouts stay distinct. It is not
    translation invariant; out["quantised"].mean((2, 3)) is the pooled alternative when that matters.
    out["codes"] (B, grid, grid) holds the code indices.
    """

    def __init__(
        self,
        depth: int,
        in_channels: int,
        image_size: int,
        codebook_size: int,
        code_dim: int,
        grid: int = 4,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1e-3,
        commitment_weight: float = 0.25,
        width: int = 64,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        self.in_channels, self.image_size = in_channels, image_size
        self.grid, self.code_dim, self.embedding_dim = grid, code_dim, code_dim * grid * grid
        self.commitment_weight = float(commitment_weight)
        self.encoder = ResNetEncoder(depth, in_channels, width)
        self.to_grid = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Conv2d(self.encoder.out_channels, code_dim, 1))
        self.quantiser = EMAVectorQuantiser(
            codebook_size, code_dim, ema_decay, dead_code_threshold, generator=generator
        )
        self.decoder = ResNetDecoder(code_dim, in_channels, image_size, seed_size=grid, width=width)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"commitment": self.commitment_weight}

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        features = self.encoder(x)
        z_e = self.to_grid(features)  # (B, D, g, g)
        batch, grid = x.shape[0], self.grid
        q = self.quantiser(z_e.permute(0, 2, 3, 1).reshape(-1, self.code_dim))
        quantised = q["quantised"].view(batch, grid, grid, self.code_dim).permute(0, 3, 1, 2)
        reconstruction = self.decoder(quantised)
        return {
            "reconstruction": reconstruction,
            "embedding": quantised.flatten(1),
            "quantised": quantised,
            "features": features.mean((2, 3)),
            "codes": q["codes"].view(batch, grid, grid),
            "encoded": z_e,
            "loss_terms": {"recon": reconstruction_loss(reconstruction, x), "commitment": q["commitment"]},
            "stats": {name: value.detach() for name, value in q["stats"].items()},
        }


# ----------------------------------------------------------------------------------------------------
# Channel folding


class ChannelFoldingWrapper(EmbeddingModel):
    """One single-channel model shared by every channel: (B, C, H, W) is folded to (B·C, 1, H, W).

    The alternative to a plain multi-channel model (in_channels=C). Channels are treated alike (a stain's
    model also serves the others) and the per-cell embedding is the concatenation of the channels'
    embeddings, (B, C × inner embedding_dim); out["channel_embeddings"] keeps them (B, C, inner dim).

    model_factory(in_channels=1) builds the inner model, e.g. functools.partial(VAE, 18, image_size=64,
    latent_dim=32). loss_terms are the inner model's plus "consistency": the squared deviation of each
    channel's embedding from the cell's mean embedding, averaged over cells, channels and latent
    dimensions (the across-channel variance, so its weight does not depend on the latent size). It is zero
    when all channels of a cell embed alike. Its weight trades channel-specific detail for agreement.
    """

    def __init__(self, model_factory: Callable[..., EmbeddingModel], channels: int, consistency_weight: float = 0.0):
        super().__init__()
        if channels < 1 or consistency_weight < 0:
            raise ValueError(f"need channels >= 1 and consistency_weight >= 0, got {channels}, {consistency_weight}")
        self.model = model_factory(in_channels=1)
        if self.model.in_channels != 1:
            raise ValueError(f"model_factory must build a single-channel model, got {self.model.in_channels}")
        self.in_channels, self.image_size = channels, self.model.image_size
        self.embedding_dim = channels * self.model.embedding_dim
        self.consistency_weight = float(consistency_weight)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {**self.model.loss_weights, "consistency": self.consistency_weight}

    @property
    def feature_dim(self) -> int:
        return self.in_channels * self.model.feature_dim

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        batch, channels, height, width = x.shape
        folded = self.model(x.reshape(batch * channels, 1, height, width))
        per_channel = folded["embedding"].view(batch, channels, -1)
        consistency = (per_channel - per_channel.mean(dim=1, keepdim=True)).pow(2).mean()
        return {
            "reconstruction": folded["reconstruction"].view(batch, channels, height, width),
            "embedding": per_channel.flatten(1),
            "channel_embeddings": per_channel,
            "features": folded["features"].view(batch, -1),
            "loss_terms": {**folded["loss_terms"], "consistency": consistency},
            "stats": folded["stats"],
            "folded": folded,
        }
