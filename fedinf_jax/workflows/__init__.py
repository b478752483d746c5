"""The top layer, what the entry points run: training, sampling, solver studies, the
reproduction, shipping trained runs, figures. Nothing else in the package imports it."""
