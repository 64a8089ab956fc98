"""Maintainer tools that read or write the source tree (docs' generated tables);
not part of the installed package. Run from the repository root, e.g.
``python -m tools.metal_lce_model --check``."""
