"""The submit host's side: render, submit, check and follow jobs on Slurm and Kubernetes.

Nothing here runs inside a rank, and nothing inside a rank (tprun/launchers/, the runner) imports it,
except JobSpec's option classes (options.py, spec_rules.py), which are plain pydantic models.
Importing this package imports nothing else, so config.py can use options.py cheaply.
"""
