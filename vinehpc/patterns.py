"""TaskVine's functional helpers on the Manager: map, pair, tree_reduce, and their remote_*
forms over an installed library (FunctionCalls instead of PythonTasks).

Each runs its own tasks with on_done callbacks, so it never takes another task from the
user's wait() and can be called while other tasks run.  Results come back in input order.
map and pair follow TaskVine's manual: an element whose call raised has the exception in its
place in the results; tree_reduce raises it (there is nothing to reduce it with).
"""
from __future__ import annotations

import functools
import itertools
import queue

from .serverless import FunctionCall
from .task import PythonTask, Resumable

POLL = 1.0      # seconds between checks that the manager is still running while waiting


def _each(fn, chunk):
    """fn over a chunk on the worker; an element that raised has its exception in its place."""
    out = []
    for x in chunk:
        try:
            out.append(fn(x))
        except Exception as e:
            out.append(e)
    return out


def _chunks(seq, n):
    it = iter(seq)
    while True:
        c = list(itertools.islice(it, n))
        if not c:
            return
        yield c


def _check_size(chunksize, least=1):
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < least:
        raise ValueError("chunksize must be an integer of at least %d, got %r" % (least, chunksize))


class PatternsMixin:
    """Manager methods map / pair / tree_reduce / remote_map / remote_pair / remote_tree_reduce."""

    def _pattern_run(self, tasks, what) -> list:
        """Submit `tasks` and wait until every one is back (checking the manager once a second)."""
        done = queue.SimpleQueue()
        for t in tasks:
            self.submit(t, on_done=done.put)
        left = len(tasks)
        while left:
            try:
                done.get(timeout=POLL)
                left -= 1
            except queue.Empty:
                if self.drained:
                    raise Resumable("the manager stopped for the walltime during %s" % what) from None
                if self.closed or self.error is not None:
                    raise RuntimeError("the manager stopped during %s (%d of %d tasks not back)"
                                       % (what, left, len(tasks))) from self.error
        return tasks

    @staticmethod
    def _pattern_values(t, n) -> list:
        """The list a chunk task returned, or its failure in each of its n places."""
        exc = t.exception
        return [exc] * n if exc is not None else list(t.output)

    def map(self, fn, seq, chunksize=1) -> list:
        """[fn(x) for x in seq], `chunksize` elements per task."""
        _check_size(chunksize)
        job = functools.partial(_each, fn)      # one function object: pickled and sent once per worker
        chunks = list(_chunks(seq, chunksize))
        tasks = self._pattern_run([PythonTask(job, c) for c in chunks], "map")
        return [v for t, c in zip(tasks, chunks) for v in self._pattern_values(t, len(c))]

    def pair(self, fn, seq1, seq2, chunksize=1, env=None) -> list:
        """[fn((a, b)) for a, b in itertools.product(seq1, seq2)]; env: an environment image."""
        _check_size(chunksize)
        job = functools.partial(_each, fn)
        chunks = list(_chunks(itertools.product(seq1, seq2), chunksize))
        tasks = [PythonTask(job, c) for c in chunks]
        if env is not None:
            for t in tasks:
                t.add_environment(env)
        self._pattern_run(tasks, "pair")
        return [v for t, c in zip(tasks, chunks) for v in self._pattern_values(t, len(c))]

    def tree_reduce(self, fn, seq, chunksize=2):
        """Reduce seq to one value: fn(list of up to `chunksize` values) on each level, level by level."""
        _check_size(chunksize, 2)
        return self._pattern_reduce(lambda c: PythonTask(fn, c), seq, chunksize, "tree_reduce")

    def _pattern_reduce(self, make, seq, chunksize, what):
        seq = list(seq)
        if not seq:
            raise ValueError("%s of an empty sequence" % what)
        while len(seq) > 1:
            tasks = self._pattern_run([make(c) for c in _chunks(seq, chunksize)], what)
            for t in tasks:
                if t.exception is not None:
                    raise t.exception
            seq = [t.output for t in tasks]
        return seq[0]

    # ---------------------------------------------------------------- over a library
    def remote_map(self, fn, seq, library, name=None, chunksize=1) -> list:
        """[library.fn(x) for x in seq] as FunctionCalls (one per element: a call is cheap, so
        chunksize is accepted and not needed; `name`, TaskVine's JSON event key, is not used:
        arguments travel pickled)."""
        _check_size(chunksize)
        tasks = self._pattern_run([FunctionCall(library, fn, x) for x in seq], "remote_map")
        return [self._pattern_value(t) for t in tasks]

    def remote_pair(self, fn, seq1, seq2, library, name=None, chunksize=1) -> list:
        """[library.fn((a, b)) for a, b in itertools.product(seq1, seq2)] as FunctionCalls."""
        _check_size(chunksize)
        tasks = self._pattern_run([FunctionCall(library, fn, p) for p in itertools.product(seq1, seq2)],
                              "remote_pair")
        return [self._pattern_value(t) for t in tasks]

    def remote_tree_reduce(self, fn, seq, library, name=None, chunksize=2):
        """tree_reduce with library.fn(list of values) as FunctionCalls."""
        _check_size(chunksize, 2)
        return self._pattern_reduce(lambda c: FunctionCall(library, fn, c), seq, chunksize, "remote_tree_reduce")

    @staticmethod
    def _pattern_value(t):
        exc = t.exception
        return exc if exc is not None else t.output
