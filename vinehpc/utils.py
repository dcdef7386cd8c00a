"""Where TaskVine scripts import library helpers from (`from ndcctools.taskvine.utils import
load_variable_from_library` becomes `from vinehpc.utils import ...`)."""
from .serverless import load_variable_from_library

__all__ = ["load_variable_from_library"]
