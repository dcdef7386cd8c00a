"""The worker: connects to a manager, caches files, runs tasks in sandboxes.

Never imports the manager side.  Rooms:

  main.py       Worker: connect, handshake, serve one manager after another; main() entry point
  loop.py       Loop: the selectors loop; messages and readiness become events, commands are carried out
  state.py      WorkerState: every decision (queue, resources, GPUs, pipelining, kills, cache references), no I/O
  events.py     TaskSpec (the task message, unpacked once) and the event and command dataclasses
  execution.py  started tasks: sandboxes, processes, interpreters, measuring, outputs, the result message
  cache.py      the cache directory's file work      sandbox.py  a task's directory
  process.py    command processes, the guardian      pypool.py, pyrunner.py  Python interpreters
  monitor.py    measuring processes and disk         resources.py  what this machine offers
"""
