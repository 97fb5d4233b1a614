"""holly-hpc: train 3D-reconstruction and bioimage-embedding models from YAML job specs, on a laptop or a SLURM cluster."""

__version__ = "0.1.0"
