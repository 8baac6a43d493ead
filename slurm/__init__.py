"""The sbatch and scrontab templates of ``pipeline slurm`` (Jinja2 files, no code).

This folder is the package ``pipeline.slurm_templates`` once installed (pyproject.toml
maps it), so an installed ``pipeline`` renders the same files; see README.md here.
"""
