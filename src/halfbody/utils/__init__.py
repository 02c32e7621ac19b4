"""Small utilities for the training entry point (Hydra instantiation helpers, repository paths)."""
