"""What the benchmarks share: timing helpers, the federated score they time, the U-Net
candidates, the two sides of the peer comparison."""
