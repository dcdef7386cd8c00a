"""How workers come to life: local processes (local.py), MPI ranks in an allocation, Slurm jobs.

mpi4py is imported lazily, here only.
"""
