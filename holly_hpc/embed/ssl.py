"""Self-supervised families of the embed kind: SimCLR (contrastive) and DINO (self-distillation).

Both learn from random views of each image (views.py) instead of reconstructing pixels, so capacity goes
to what survives cropping, turning, blurring and intensity changes (the cell's shape, texture and marker
pattern) rather than to where the cell sits or how bright the field was. They share the ResNet encoders
and the readouts of every family:

    features   (B, feature_dim)   the encoder's feature map averaged over space (DINO: the teacher's)
    embedding  (B, latent_dim)    SimCLR: the projection head's output; DINO: the head's bottleneck
                                  before the prototypes (the teacher's), both L2-normalised

Training mode takes a list of views, [global_1, global_2, local_1, ...] (B, C, S, S) each (local views
may be smaller), and returns loss_terms and stats; given a plain tensor, either mode returns the readouts.

SimCLR (Chen et al. 2020): NT-Xent over the two global views, each image's other view its positive and the
other 2B - 2 views of the batch its negatives (per process under DDP: negatives are not gathered across
ranks, so the effective batch for the loss is the per-rank batch).

DINO (Caron et al. 2021): a student and a teacher of the same architecture; the teacher is an exponential
moving average of the student (momentum from teacher_momentum to 1 on a cosine over the run, `after_step`),
gets only the global views, and its outputs are centred (a running mean, all-reduced over ranks) and
sharpened (a low temperature); the student matches the teacher's distribution over `prototypes` from
every other view (multi-crop). The teacher and the centre are buffers of the model, so checkpoints hold
them and a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.distributed import all_sum
from .models import EmbeddingModel
from .resnet import ResNetEncoder


class SelfSupervisedModel(EmbeddingModel):
    """Base of the families that train on views: no reconstruction, the loss is the family's term."""

    self_supervised = True
    main_term: str = ""
    local_views = 0  # views besides the two global ones (DINO's multi-crop)

    def loss(self, x, out: dict) -> torch.Tensor:  # x unused: the views are the targets of one another
        return out["loss_terms"][self.main_term]

    def check_views(self, views) -> None:
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError(
                f"{type(self).__name__} trains on a list of at least two views, got {type(views).__name__}"
            )
        for view in views:
            if view.dim() != 4 or view.shape[1] != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__}: views must be (B, {self.in_channels}, S, S), got {tuple(view.shape)}"
                )


def mlp(sizes: list[int], batch_norm: bool, activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (c_in, c_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(c_in, c_out))
        if index < len(sizes) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(c_out))
            layers.append(activation())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------
# SimCLR


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of two views' projections (B, D) each -> (loss, top-1 accuracy of finding the positive).

    Cosine similarities of all 2B projections over the temperature; row i's positive is its other view,
    its negatives every other row but itself."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    similarity = z @ z.t() / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    loss = F.cross_entropy(similarity, targets)
    accuracy = (similarity.argmax(dim=1) == targets).float().mean()
    return loss, accuracy


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The loss of nt_xent written row by row, as in the paper's algorithm 1 (a test's reference)."""
    z = [F.normalize(v.double(), dim=0) for v in torch.cat([z1, z2])]
    n, total = z1.shape[0], 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[positive]) / temperature) / sum(others))
    return total / (2 * n)


class SimCLR(SelfSupervisedModel):
    """ResNet encoder -> global average pool -> projection head (Linear-BN-ReLU-Linear) -> NT-Xent."""

    main_term = "contrastive"

    def __init__(
        self,
        depth: int,
        in_channels: int,
        image_size: int,
        latent_dim: int,
        width: int = 32,
        hidden: int = 256,
        temperature: float = 0.2,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.in_channels, self.image_size, self.embedding_dim = in_channels, image_size, latent_dim
        self.temperature = float(temperature)
        self.encoder = ResNetEncoder(depth, in_channels, width)
        self.projector = mlp([self.encoder.out_channels, hidden, latent_dim], batch_norm=True, activation=nn.ReLU)

    def readouts(self, x: torch.Tensor) -> dict:
        features = self.encoder(x).mean((2, 3))
        return {"features": features, "embedding": F.normalize(self.projector(features), dim=1)}

    def forward(self, x) -> dict:
        if isinstance(x, torch.Tensor):
            self.check_input(x)
            return {**self.readouts(x), "loss_terms": {}, "stats": {}}
        self.check_views(x)
        first, second = x[0], x[1]
        batch = first.shape[0]
        # One pass of both views: BatchNorm sees the 2B views as one batch, as in the paper.
        features = self.encoder(torch.cat([first, second])).mean((2, 3))
        projected = self.projector(features)
        loss, accuracy = nt_xent(projected[:batch], projected[batch:], self.temperature)
        normalised = F.normalize(projected[:batch].detach().float(), dim=1)
        return {
            "features": features[:batch],
            "embedding": normalised,
            "loss_terms": {"contrastive": loss},
            "stats": {"contrastive_accuracy": accuracy.detach(), "embedding_std": normalised.std(dim=0).mean()},
        }


# ----------------------------------------------------------------------------------------------------
# DINO


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2-normalised, then cosine similarity to `prototypes` learnt vectors
    (DINO's weight-normalised last layer with its norm fixed to 1)."""

    def __init__(self, in_features: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = mlp([in_features, hidden, hidden, bottleneck], batch_norm=False, activation=nn.GELU)
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) / math.sqrt(bottleneck))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (bottleneck normalised (B, bottleneck), logits (B, prototypes))."""
        bottleneck = F.normalize(self.mlp(features), dim=1)
        return bottleneck, bottleneck @ F.normalize(self.prototypes, dim=1).t()


class DINOBranch(nn.Module):
    """Encoder + head: what student and teacher each are."""

    def __init__(self, depth: int, in_channels: int, width: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.encoder = ResNetEncoder(depth, in_channels, width)
        self.head = DINOHead(self.encoder.out_channels, hidden, bottleneck, prototypes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (features, bottleneck, logits)."""
        features = self.encoder(x).mean((2, 3))
        bottleneck, logits = self.head(features)
        return features, bottleneck, logits


def teacher_momentum(step: int, total_steps: int, start: float) -> float:
    """DINO's schedule: from `start` at step 0 to 1 at the last step along a half cosine."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1 - (1 - start) * (math.cos(math.pi * progress) + 1) / 2


def dino_loss(
    student_logits: list[torch.Tensor], teacher_probabilities: list[torch.Tensor], student_temperature: float
) -> torch.Tensor:
    """Cross-entropy of the teacher's distribution (one per global view) against the student's log-softmax
    for every other view, averaged over the pairs (a global view is not matched with itself)."""
    total, pairs = 0.0, 0
    for t_index, teacher in enumerate(teacher_probabilities):
        for s_index, logits in enumerate(student_logits):
            if s_index == t_index:
                continue
            log_student = F.log_softmax(logits.float() / student_temperature, dim=1)
            total = total + (-(teacher * log_student).sum(dim=1)).mean()
            pairs += 1
    return total / pairs


class DINO(SelfSupervisedModel):
    """Student/teacher self-distillation with multi-crop (see the module docstring)."""

    main_term = "distillation"

    def __init__(
        self,
        depth: int,
        in_channels: int,
        image_size: int,
        latent_dim: int,
        width: int = 32,
        hidden: int = 256,
        prototypes: int = 256,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        momentum: float = 0.996,
        center_momentum: float = 0.9,
        local_views: int = 4,
    ):
        super().__init__()
        if teacher_temperature <= 0 or student_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {student_temperature}, {teacher_temperature}")
        if not 0 <= momentum < 1 or not 0 <= center_momentum < 1:
            raise ValueError(f"momenta must be in [0, 1), got {momentum}, {center_momentum}")
        self.in_channels, self.image_size, self.embedding_dim = in_channels, image_size, latent_dim
        self.student_temperature, self.teacher_temperature = float(student_temperature), float(teacher_temperature)
        self.momentum, self.center_momentum, self.local_views = float(momentum), float(center_momentum), local_views
        self.student = DINOBranch(depth, in_channels, width, hidden, latent_dim, prototypes)
        self.teacher = copy.deepcopy(self.student)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, prototypes))

    @property
    def encoder(self) -> ResNetEncoder:  # feature_dim reads it
        return self.teacher.encoder

    def forward(self, x) -> dict:
        if isinstance(x, torch.Tensor):
            self.check_input(x)
            features, bottleneck, _ = self.teacher(x)
            return {"features": features, "embedding": bottleneck, "loss_terms": {}, "stats": {}}
        self.check_views(x)
        globals_, batch = x[:2], x[0].shape[0]
        with torch.no_grad():
            t_features, t_bottleneck, t_logits = self.teacher(torch.cat(globals_))
            t_logits = t_logits.float()
            teacher = F.softmax((t_logits - self.center) / self.teacher_temperature, dim=1)
            if self.training:
                self.update_center(t_logits)
        student_logits: list = [None] * len(x)
        for group in _same_size_groups(x):  # one pass per crop size (BatchNorm sees each as a batch)
            _, _, logits = self.student(torch.cat([x[i] for i in group]))
            for index, part in zip(group, logits.split(batch), strict=True):
                student_logits[index] = part
        loss = dino_loss(student_logits, list(teacher.split(batch)), self.student_temperature)
        mean_distribution = teacher.mean(dim=0)
        stats = {
            # Collapse shows here: one prototype for every image (batch entropy -> 0) or a uniform teacher
            # (teacher entropy -> log prototypes).
            "teacher_entropy": (-(teacher * teacher.clamp_min(1e-12).log()).sum(dim=1)).mean(),
            "batch_entropy": -(mean_distribution * mean_distribution.clamp_min(1e-12).log()).sum(),
        }
        return {
            "features": t_features[:batch],
            "embedding": t_bottleneck[:batch],
            "loss_terms": {"distillation": loss},
            "stats": stats,
        }

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        # The global batch's mean: the rows summed over the ranks over the rows counted over the ranks.
        total = all_sum(torch.cat([teacher_logits.sum(dim=0), teacher_logits.new_full((1,), teacher_logits.shape[0])]))
        batch_mean = (total[:-1] / total[-1])[None]
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """The teacher moves toward the student after each optimiser step."""
        m = teacher_momentum(step, total_steps, self.momentum)
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            teacher.mul_(m).add_(student.detach(), alpha=1 - m)


def _same_size_groups(views) -> list[list[int]]:
    """Indices of the views grouped by spatial size, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for index, view in enumerate(views):
        groups.setdefault(tuple(view.shape[-2:]), []).append(index)
    return list(groups.values())
