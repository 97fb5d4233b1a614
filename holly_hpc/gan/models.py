"""InfoGAN (Chen et al. 2016) for cell images: a DCGAN-style generator, a discriminator whose trunk is shared
with the Q head, latent codes, the adversarial losses and the mutual-information lower bound.

Latent input of the generator: noise z ~ N(0, I) (noise_dim) ⊕ one-hot categorical codes c_k ~ Cat(1/K_k)
⊕ continuous codes c_j ~ U(-1, 1). Q(c | x) is a softmax per categorical code and a factored Gaussian
(mean, log std) per continuous code. The bound on the mutual information of each code with the image,

    L_I(c) = H(c) − CE(c, Q(c | G(z, c)))      ≤ I(c; G(z, c)),

reaches its maximum H(c) (log K for a categorical code; log 2 nats for U(-1, 1)) when Q recovers the code
exactly (for continuous codes "exactly" is bounded by the predicted std).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VALID_SIZES = tuple(s * 2**k for k in range(3, 6) for s in (4, 5, 6, 7) if 32 <= s * 2**k <= 128)
LOG_STD_RANGE = (-5.0, 2.0)


def start_size(image_size: int) -> tuple[int, int]:
    """(seed side, number of 2x upsamplings): image_size = seed · 2^n with a seed of 4 to 7 pixels."""
    for ups in range(6, 2, -1):
        seed, rem = divmod(image_size, 2**ups)
        if rem == 0 and 4 <= seed <= 7:
            return seed, ups
    raise ValueError(f"image size {image_size} is not a 4–7 pixel seed times a power of two (e.g. 32, 48, 64, 96, 128)")


class CodeSpec:
    """The latent layout: noise, categorical code sizes, continuous code count."""

    def __init__(self, noise_dim: int, categorical: list[int], continuous: int):
        if any(k < 2 for k in categorical):
            raise ValueError(f"categorical codes need at least 2 values, got {categorical}")
        self.noise_dim, self.categorical, self.continuous = noise_dim, list(categorical), continuous
        self.dim = noise_dim + sum(categorical) + continuous

    def names(self) -> list[str]:
        return [f"cat{i}" for i in range(len(self.categorical))] + [f"cont{j}" for j in range(self.continuous)]

    def entropies(self) -> dict[str, float]:
        """H(c) of each code in nats: log K, or log 2 for U(-1, 1) (the maximum of its MI bound)."""
        out = {f"cat{i}": math.log(k) for i, k in enumerate(self.categorical)}
        out.update({f"cont{j}": math.log(2.0) for j in range(self.continuous)})
        return out

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{"noise" (B, noise_dim), "cat" (B, n_cat) long, "cont" (B, n_cont)} on the CPU, from `generator`."""
        noise = torch.randn(batch, self.noise_dim, generator=generator)
        cat = (
            torch.stack([torch.randint(0, k, (batch,), generator=generator) for k in self.categorical], 1)
            if self.categorical
            else torch.zeros(batch, 0, dtype=torch.long)
        )
        cont = 2 * torch.rand(batch, self.continuous, generator=generator) - 1
        return {"noise": noise, "cat": cat, "cont": cont}

    def latent(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's input vector (B, dim)."""
        one_hot = [F.one_hot(codes["cat"][:, i], k).float() for i, k in enumerate(self.categorical)]
        return torch.cat([codes["noise"], *one_hot, codes["cont"]], dim=1)


class Generator(nn.Module):
    """Latent (B, dim) -> images (B, channels, S, S) in [0, 1]: a linear map to a small seed grid, then
    2x transposed convolutions with BatchNorm + ReLU, halving the width each time, and a sigmoid."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        self.seed, ups = start_size(image_size)
        widths = [width * 2 ** max(ups - 1 - i, 0) for i in range(ups)]  # ..., 4w, 2w, w
        self.seed_channels = widths[0] * 2
        self.project = nn.Sequential(
            nn.Linear(latent_dim, self.seed_channels * self.seed**2, bias=False),
            nn.BatchNorm1d(self.seed_channels * self.seed**2),
            nn.ReLU(inplace=True),
        )
        layers, c_in = [], self.seed_channels
        for c_out in widths:
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        seed = self.project(latent).view(latent.shape[0], self.seed_channels, self.seed, self.seed)
        return torch.sigmoid(self.body(seed))


class Discriminator(nn.Module):
    """Images -> (real/fake logit (B,), Q's outputs): a strided-conv trunk (LeakyReLU; BatchNorm after the
    first layer, as in DCGAN and InfoGAN) shared by the discriminator head and the Q head."""

    def __init__(self, codes: CodeSpec, channels: int, image_size: int, width: int = 64, q_hidden: int = 128):
        super().__init__()
        self.codes = codes
        seed, downs = start_size(image_size)
        layers, c_in = [], channels
        for i in range(downs):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        features = c_in * seed * seed
        self.real_fake = nn.Linear(features, 1)
        outputs = sum(codes.categorical) + 2 * codes.continuous
        self.q = nn.Sequential(
            nn.Linear(features, q_hidden),
            nn.BatchNorm1d(q_hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(q_hidden, max(outputs, 1)),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
        h = self.trunk(images)
        return self.real_fake(h).squeeze(1), self.q_outputs(self.q(h))

    def q_outputs(self, raw: torch.Tensor) -> dict[str, object]:
        """{"cat_logits": [(B, K_k)], "cont_mean": (B, n), "cont_log_std": (B, n)}"""
        logits, start = [], 0
        for k in self.codes.categorical:
            logits.append(raw[:, start : start + k])
            start += k
        n = self.codes.continuous
        mean, log_std = raw[:, start : start + n], raw[:, start + n : start + 2 * n].clamp(*LOG_STD_RANGE)
        return {"cat_logits": logits, "cont_mean": mean, "cont_log_std": log_std}


# ------------------------------------------------------------------------------------------ losses
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "standard":
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: standard or hinge")


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "standard":  # non-saturating: maximise log D(G(z)) rather than minimise log(1 − D(G(z)))
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"unknown GAN loss {kind!r}: standard or hinge")


def code_cross_entropies(q: dict, codes: dict[str, torch.Tensor], spec: CodeSpec) -> dict[str, torch.Tensor]:
    """CE(c, Q(c|x)) per code, in nats per sample: softmax cross-entropy for a categorical code, Gaussian
    negative log-likelihood (with its constant) for a continuous one."""
    out = {}
    for i, logits in enumerate(q["cat_logits"]):
        out[f"cat{i}"] = F.cross_entropy(logits, codes["cat"][:, i])
    for j in range(spec.continuous):
        mean, log_std = q["cont_mean"][:, j], q["cont_log_std"][:, j]
        z = (codes["cont"][:, j] - mean) * torch.exp(-log_std)
        out[f"cont{j}"] = (0.5 * z.pow(2) + log_std + 0.5 * math.log(2 * math.pi)).mean()
    return out


def info_loss(cross_entropies: dict[str, torch.Tensor], lambda_cat: float, lambda_cont: float) -> torch.Tensor:
    """λ-weighted sum of the codes' cross-entropies: minimising it maximises the MI bound (H(c) is fixed)."""
    return sum((lambda_cat if name.startswith("cat") else lambda_cont) * ce for name, ce in cross_entropies.items())


def mi_estimates(cross_entropies: dict[str, torch.Tensor], spec: CodeSpec) -> dict[str, float]:
    """The lower bound H(c) − CE per code, in nats."""
    entropies = spec.entropies()
    return {name: entropies[name] - float(ce) for name, ce in cross_entropies.items()}
