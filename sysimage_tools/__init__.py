"""Tools for auditing and shipping task environments.

Planned contents (standard library only): an strace audit (runner, pure parser,
report), Python environment images, a Julia sysimage driver, and node-local
deploy (unpack once per node, atomically, cached by hash).
"""
