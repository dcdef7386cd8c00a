"""The worker: connects to a manager, caches files, runs tasks in sandboxes.

Never imports the manager side.
"""
