"""Gridded climate data to trained, evaluated ML models.

Stages: preprocess (Dask + xarray -> Zarr v3 store), train (PyTorch on Ray Train),
evaluate and forecast, all runnable locally or as Slurm jobs. See README.md.
"""

__version__ = "0.1.0"
