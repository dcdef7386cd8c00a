"""vinehpc: many-task workloads inside HPC allocations (TaskVine's model, pilot-job style).

Public names are imported on first use (PEP 562), so `python -m vinehpc worker` and
`vinehpc sysimage run` do not pay for the manager side.
"""
__version__ = "0.1.0"
__all__ = ["Manager", "Task", "PythonTask", "PythonTaskNoResult", "FunctionCallNoResult", "Executor", "FuturesExecutor", "FuturePythonTask", "FutureFunctionCall",
           "File", "TaskError",
           "RemoteTraceback", "Resumable", "DaskVine", "Factory", "FunctionCall", "LibraryTask", "load_variable_from_library",
           "__version__"]

# TaskVine's constants that scripts compare with or pass (`vine.VINE_SCHEDULE_FILES`): result words
# are strings, as TaskVine's Python Task.result is
VINE_DEFAULT_PORT = 9123
VINE_SCHEDULE_FCFS, VINE_SCHEDULE_FILES = 1, 2
VINE_RESULT_SUCCESS = "success"
VINE_RESULT_INPUT_MISSING = "input missing"
VINE_RESULT_OUTPUT_MISSING = "output missing"
VINE_RESULT_OUTPUT_TRANSFER_ERROR = "output transfer error"    # the task ran; the manager could not write its output
VINE_RESULT_RESOURCE_EXHAUSTION = "resource exhaustion"
VINE_RESULT_CANCELLED = "cancelled"
VINE_RESULT_MAX_RETRIES = "max retries"     # vinehpc: a poison task (worker lost N times while running it)

_where = {"Manager": "manager", "Executor": "futures", "File": "file", "Task": "task", "PythonTask": "task",
          "PythonTaskNoResult": "task", "FunctionCallNoResult": "task", "TaskError": "task", "RemoteTraceback": "task", "Resumable": "task",
          "DaskVine": "dask_vine", "Factory": "factory", "FuturesExecutor": "futures_vine", "FuturePythonTask": "futures", "FutureFunctionCall": "futures",
          "FunctionCall": "serverless", "LibraryTask": "serverless", "load_variable_from_library": "serverless"}


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
