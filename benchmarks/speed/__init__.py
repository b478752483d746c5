"""Speed benchmarks of this project's own parts on this machine."""
