"""vinehpc: many-task workloads inside HPC allocations (TaskVine's model, pilot-job style).

Public names are imported on first use (PEP 562), so `python -m vinehpc worker` and
`vinehpc sysimage run` do not pay for the manager side.
"""
__version__ = "0.1.0"
__all__ = ["Manager", "Task", "PythonTask", "Executor", "FuturesExecutor", "FuturePythonTask", "File", "TaskError",
           "RemoteTraceback", "Resumable", "__version__"]

_where = {"Manager": "manager", "Executor": "futures", "FuturesExecutor": "futures_vine", "FuturePythonTask": "futures",
          "File": "file", "Task": "task", "PythonTask": "task", "TaskError": "task", "RemoteTraceback": "task",
          "Resumable": "task"}


def __getattr__(name):
    mod = _where.get(name)
    if mod is None:
        raise AttributeError("module 'vinehpc' has no attribute %r" % name)
    import importlib
    value = getattr(importlib.import_module("." + mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
