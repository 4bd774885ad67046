"""Launching: one machine (torchrun or the deepspeed launcher) and SLURM (submitit: training jobs
that requeue themselves, data_tools stages as job arrays). `python -m launch --help`."""
