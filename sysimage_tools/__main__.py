"""`python -m sysimage_tools run IMAGE -- CMD` (and the other `vinehpc sysimage` subcommands)
without importing the vinehpc engine: the lean path for nodes."""
import sys

from .cli import standalone

sys.exit(standalone())
