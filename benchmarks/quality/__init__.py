"""Quality experiments: sample quality against training time, and the density-weighted
members' weights."""
