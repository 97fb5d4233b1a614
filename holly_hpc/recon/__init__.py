"""HOLLy-class reconstruction: rotations, the Gaussian renderer, the pose CNN, simulation and metrics."""
