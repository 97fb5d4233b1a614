"""Task kind `pose`: learn to predict each image's orientation of a known structure.

Images of the structure at random rotations are rendered on the fly; the CNN predicts a rotation per
image; the structure is rendered at the predicted rotation by the same differentiable renderer and the
image loss trains the CNN. No ground-truth rotation enters the loss: it is only used to measure the
rotation error on a held-out set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io.mesh import write_obj, write_ply
from ..runtime.distributed import DistInfo
from ..runtime.kinds import TaskKind, WeightsCache, evaluating, make_lr_scheduler, optimiser_step, wrap_ddp
from ..runtime.outputs import image_rows, save_png, to_unit_range
from .geometry import rotation_error_deg
from .losses import best_of_hypotheses
from .metrics import rotation_error_summary
from .posenet import PoseNet
from .render import render_images
from .simulate import (
    BUILTIN_SYMMETRY,
    EVAL_STREAM,
    batch_generator,
    load_structure,
    simulate_batch,
    structure_problem,
)

N_SHOWN = 8  # images per row in the input-vs-render grids


class PoseTask(TaskKind):
    @classmethod
    def check_config(cls, config: dict, base_dir: Path) -> list[tuple[tuple, str]]:
        problem = structure_problem(config["data"]["structure"], base_dir, BUILTIN_SYMMETRY)
        return [(("data", "structure"), problem)] if problem else []

    def __init__(self, config: dict, device: torch.device, base_dir: Path, dist: DistInfo | None = None):
        self.config, self.device, self.dist = config, device, dist or DistInfo()
        data, model, train = config["data"], config["model"], config["train"]
        self.structure = load_structure(
            data["structure"], data["num_points"], data["radius"], base_dir, data["symmetry"]
        )
        self.points = self.structure.points.to(device)
        self.net = PoseNet(
            model["channels"], model["hidden"], data["max_translation"], hypotheses=model["hypotheses"]
        ).to(device)
        self.trained = wrap_ddp(self.net, self.dist, device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
        self.scheduler = make_lr_scheduler(self.optimizer, train)
        self.eval_set = self._batch(EVAL_STREAM, data["eval_size"])
        self.weights = WeightsCache()  # held-out predictions, until the weights change

    def _batch(self, position: int, size: int) -> dict[str, torch.Tensor]:
        data = self.config["data"]
        generator = batch_generator(self.config["seed"], position)
        return simulate_batch(
            self.structure, size, data["image_size"], data["sigma"], data["max_translation"], generator, self.device
        )

    def _render(self, rotations, translations) -> torch.Tensor:
        data = self.config["data"]
        return render_images(self.points, rotations, data["sigma"], data["image_size"], translations)

    def _best(self, pred, images: torch.Tensor):
        """(loss, best rotations, their renders) over the network's rotation hypotheses."""

        def render(rotations: torch.Tensor, k: int) -> torch.Tensor:
            t = None if pred.translations is None else pred.translations.repeat_interleave(k, dim=0)
            return self._render(rotations, t)

        return best_of_hypotheses(pred.candidates, render, images, self.config["train"]["loss"], False)

    def train_step(self, step: int) -> dict[str, torch.Tensor | float]:
        batch = self.dist.shard(self._batch(step, self.config["train"]["batch_size"]))
        self.net.train()
        pred = self.trained(batch["images"])
        loss, _, _ = self._best(pred, batch["images"])
        (lr,) = optimiser_step(loss, self.optimizer, self.scheduler, weights=self.weights)
        # A tensor, not a float: the Trainer converts it only when it logs (no device sync every step).
        return {"loss": loss.detach(), "lr": lr}

    def _predict_eval(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(best rotations, translations, their renders, loss) on the held-out set, once per weights."""
        return self.weights.get("eval", self._compute_eval)

    @torch.no_grad()
    def _compute_eval(self):
        with evaluating(self.net):
            pred = self.net(self.eval_set["images"])
            loss, best, rendered = self._best(pred, self.eval_set["images"])  # the hypothesis that fits best
        return best, pred.translations, rendered, loss

    def evaluate(self) -> dict[str, float]:
        rotations, _, _, loss = self._predict_eval()
        errors = rotation_error_deg(rotations, self.eval_set["rotations"], self.structure.symmetry)
        metrics = rotation_error_summary(errors)
        metrics["eval_loss"] = loss.item()
        return metrics

    def image_grids(self) -> dict[str, torch.Tensor]:
        _, _, rendered, _ = self._predict_eval()
        rendered = rendered[:N_SHOWN]
        inputs = self.eval_set["images"][:N_SHOWN]
        return {"eval/inputs_vs_renders": image_rows([to_unit_range(inputs), to_unit_range(rendered)])}

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.weights.changed()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def write_outputs(self, final_dir: Path, store) -> dict[str, float]:
        rotations, translations, _, _ = self._predict_eval()
        errors = rotation_error_deg(rotations, self.eval_set["rotations"], self.structure.symmetry)
        store.write_array("eval/rotations_true", self.eval_set["rotations"].cpu().numpy())
        store.write_array("eval/rotations_pred", rotations.cpu().numpy())
        store.write_array("eval/rotation_error_deg", errors.cpu().numpy())
        if translations is not None:
            store.write_array("eval/translations_true", self.eval_set["translations"].cpu().numpy())
            store.write_array("eval/translations_pred", translations.cpu().numpy())
        points = self.structure.points.numpy()
        store.write_array("structure/points", points)
        write_ply(final_dir / "structure.ply", points)
        write_obj(final_dir / "structure.obj", points)
        save_png(final_dir / "renders.png", self.image_grids()["eval/inputs_vs_renders"])
        return self.evaluate()
