"""vinehpc: many-task workloads inside HPC allocations (TaskVine's model, pilot-job style)."""
from .file import File
from .futures import Executor
from .manager import Manager
from .task import PythonTask, RemoteTraceback, Resumable, Task, TaskError

__version__ = "0.1.0"
__all__ = ["Manager", "Task", "PythonTask", "Executor", "File", "TaskError", "RemoteTraceback", "Resumable", "__version__"]
