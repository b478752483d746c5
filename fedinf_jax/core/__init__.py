"""The bottom layer: plug-in registries, user errors, atomic files, array types, process set-up
and what made an output (provenance). It imports nothing else of the package."""
