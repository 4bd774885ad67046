"""Launching: single node (deepspeed launcher, torchrun) and SLURM (submitit)."""
