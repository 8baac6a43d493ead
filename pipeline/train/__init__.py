"""Models, the plain training loop, checkpoints and the Ray Train shell."""
