"""Data layer: sources, transforms, statistics, the Zarr store, the torch loader.

Never imports ray; only ``loader`` imports torch.
"""
