"""Shared core: config, data contract, images, models, heads, metrics, file I/O and the on-disk layout.

The core imports no stage, tool or the command line."""
