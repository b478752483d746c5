"""The accelerator check: the project's GPU/TPU claims in one command (tested on virtual CPU
devices)."""
