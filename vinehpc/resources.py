"""The resources a task asks for and a worker offers, in one order, for both sides.

cores (count), memory and disk (MB), gpus (count).  A stdlib-free leaf: the manager's core
and the worker both import it; it imports nothing.
"""
RES = ("cores", "memory", "disk", "gpus")
