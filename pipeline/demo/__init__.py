"""The demo data: synthetic ERA5-like NetCDF files from a small, deterministic,
learnable climate simulation.

Why: demos, tests and benchmarks need realistic raw NetCDF files (levels, CF
attributes, monthly files, calendars) whose next state really follows from the current
one. ``spec`` says what to simulate, ``simulation`` runs the model, ``files`` writes
and checks the files.
"""
