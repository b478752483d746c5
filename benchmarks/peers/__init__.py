"""fedinf_jax against the paper's stack (PyTorch + diffusers)."""
