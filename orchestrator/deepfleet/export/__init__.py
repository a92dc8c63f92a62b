"""The same job for another scheduler (Slurm)."""
