"""The task kinds by name: kind name -> "module:Class" of its TaskKind (see runtime.kinds).

Kept apart from runtime.kinds, which imports torch, so that spec validation can know the names without it.
"""

from __future__ import annotations

# Imported only when a task of that kind runs (runtime.kinds.get_kind).
KINDS = {
    "pose": "holly_hpc.recon.pose:PoseTask",
    "reconstruct": "holly_hpc.recon.reconstruct:ReconstructTask",
    "embed": "holly_hpc.embed.task:EmbedTask",
    "generate": "holly_hpc.gan.task:GenerateTask",
}
