"""Forward SDEs (``sde``), the network read as a score and its loss (``score``), and
log-densities along a trajectory (``density``)."""
