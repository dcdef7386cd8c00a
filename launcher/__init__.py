"""How a tasks.py meets its workers: `vinehpc run` on this machine (local.py), `vinehpc pilot`
as MPI ranks in an allocation (pilot.py, slurm.py, contact.py).

Above the engine: launcher imports vinehpc, and vinehpc never imports launcher (the worker
processes themselves are started by vinehpc.local).  mpi4py is imported lazily, here only.
"""
