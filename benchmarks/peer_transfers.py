"""Worker-to-worker transfers (issue 16): what crosses the manager's link, and how fast an input
reaches every worker.

    python benchmarks/peer_transfers.py [--workers 16] [--size-mb 200] [--maps 64] [--temp-mb 10] [--rate MBIT]

--rate (root): the fan-out runs on workers each behind its own link of that rate (namespaces and
tc tbf, benchmarks/ratelimited_net.py), so copies are bound by links as on a cluster; without it
everything shares this machine's cores and loopback, and the times measure the machine.

1. Fan-out: one input of --size-mb (declare_file(cache=True)) needed by one task on each of
   --workers real worker processes (1 core each, on this machine), peer transfers off, then on
   (default source limit): bytes the manager sent for it (its `put` records: copies_from_manager),
   and the time from submitting until every worker has it (every task, each a `test -s` of it, is
   back).  `time_ratio`: that time with peers on / the time one worker alone takes to get it from
   the manager (the same measure, one worker).  Target: <= 2 copies (vs one per worker), ratio <= 1.5.
2. Temps: a map -> reduce tree over --maps tasks, each writing a --temp-mb temp; each reduce
   reads two temps and writes one; off, then on: temp bytes through the manager (temps fetched to it,
   m.stats bytes_received, plus temps it sent, its `put` records).  Target: 0 with peers on.
3. Source kill: worker A holds a --size-mb input; worker B's task needs it and fetches it from A;
   A is killed mid-transfer (B paused for a moment so A is certainly mid-file).  OK when B's task
   succeeds at its first attempt and the journal shows the failed transfer and no retry.

Ends with one line:  PEER workers=W copies_from_manager=C time_ratio=R temp_bytes_via_manager=B source_kill_ok=K
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import time

from vinehpc import Manager, Task


def journal(m, event=None):
    with open(os.path.join(m.run_dir, "transactions.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if event is None or r.get("event") == event]


def manager(tmp, name, workers, peers, limit=None, net=None):
    """A manager with `workers` workers: local ones, or one in each namespace of `net` (--rate)."""
    if net is None:
        m = Manager(local_workers=workers, run_dir=os.path.join(tmp, name))
    else:
        # keepalive: with peers off, each worker's put of a big input takes minutes on a slow link,
        # and a worker says nothing while it receives (the manager would call it lost at 30 s)
        m = Manager(port=0, host=net.ip, run_dir=os.path.join(tmp, name), keepalive_timeout=3600)
        net.start_workers(workers, "%s:%d" % (net.ip, m.port), m.secret_file, tmp)
    if not peers:
        m.disable_peer_transfers()
    if limit:
        m.set_file_source_max_transfers(limit)
    m.wait_for_workers(workers, timeout=120)
    return m


def wait_n(m, n, timeout=600):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        t = m.wait(max(0.1, deadline - time.monotonic()))
        if t is None:
            raise SystemExit("timeout: %d of %d tasks back" % (len(got), n))
        if not t.successful():
            raise SystemExit("task %s failed: %s %s" % (t.id, t.result, t.reason))
        got.append(t)
    return got


def fan_out(tmp, src, workers, peers, limit=None, net=None):
    """(seconds until every worker's task is back, bytes the manager put of the input, transfer records)."""
    m = manager(tmp, "fan-%s-%d-limit%s" % ("on" if peers else "off", workers, limit), workers, peers, limit, net)
    try:
        f = m.declare_file(src, cache=True)
        f.cachename()                      # hashed before the clock starts (both modes alike)
        t0 = time.perf_counter()
        for w in m.workers():
            t = Task("test -s in")         # holds it (the worker checked its digest): no read to time
            t.add_input(f, "in")
            m.submit(t, worker=w["id"])
        wait_n(m, workers)
        secs = time.perf_counter() - t0
        sent = sum(r["size"] for r in journal(m, "put") if r["file"] == f.cachename())
        moves = [r for r in journal(m, "transfer") if r["file"] == f.cachename()]
        return secs, sent, moves
    finally:
        m.close()
        if net is not None:
            net.stop_workers()


def temp_tree(tmp, maps, temp_mb, workers, peers):
    """Temp bytes through the manager for a map -> pairwise reduce tree."""
    m = manager(tmp, "temps-%s" % ("on" if peers else "off"), workers, peers)
    try:
        level = []
        for i in range(maps):
            tf = m.declare_temp()
            t = Task("head -c %d /dev/urandom > out" % (temp_mb << 20))
            t.add_output(tf, "out")
            m.submit(t)
            level.append(tf)
        n = maps
        while len(level) > 1:
            nxt = []
            for a, b in zip(level[0::2], level[1::2]):
                tf = m.declare_temp()
                t = Task("cat a b | head -c %d > out" % (temp_mb << 20))
                t.add_input(a, "a")
                t.add_input(b, "b")
                t.add_output(tf, "out")
                m.submit(t)
                nxt.append(tf)
                n += 1
            level = nxt
        t0 = time.perf_counter()
        wait_n(m, n)
        secs = time.perf_counter() - t0
        sent = sum(r.get("size") or 0 for r in journal(m, "put") if r["file"].startswith("temp-"))
        received = m.stats["bytes_received"]
        moved = sum(r["bytes"] for r in journal(m, "transfer") if r["file"].startswith("temp-"))
        return sent + received, moved, secs
    finally:
        m.close()


def source_kill(tmp, src):
    """True when a task whose input's source was killed mid-transfer still succeeded, first attempt."""
    m = manager(tmp, "kill", 2, True)
    try:
        joined = {r["worker"]: r for r in journal(m, "worker joined")}
        a, b = sorted(joined)
        f = m.declare_file(src, cache=True)
        first = Task("cksum in")
        first.add_input(f, "in")
        m.submit(first, worker=a)
        wait_n(m, 1)
        part = os.path.join(os.path.dirname(joined[b]["log"]), "cache", ".peer-" + f.cachename())
        t = Task("cksum in")
        t.add_input(f, "in")
        t.set_retries(0)
        m.submit(t, worker=b)
        deadline = time.monotonic() + 60
        while not os.path.exists(part):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        os.kill(joined[b]["pid"], signal.SIGSTOP)
        try:
            time.sleep(0.3)
            os.kill(joined[a]["pid"], signal.SIGKILL)
        finally:
            os.kill(joined[b]["pid"], signal.SIGCONT)
        (done,) = wait_n(m, 1)
        recs = journal(m)
        failed = [r for r in recs if r["event"] == "transfer failed" and r["dest"] == b and r["source"] == a]
        retried = [r for r in recs if r["event"] in ("retry", "requeued", "failed")]
        return done is t and t.attempts == 1 and bool(failed) and not retried
    finally:
        m.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--maps", type=int, default=64)
    ap.add_argument("--temp-mb", type=int, default=10)
    ap.add_argument("--temp-workers", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="set_file_source_max_transfers (default: vinehpc's)")
    ap.add_argument("--rate", type=int, default=None, metavar="MBIT",
                    help="fan-out on a network: every worker (and the manager) behind its own link of this "
                         "rate (namespaces, tc tbf; needs root): copies bound by links, not by this machine")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vinehpc-peer-bench-")
    src = os.path.join(tmp, "input.bin")
    with open(src, "wb") as f:
        for _ in range(args.size_mb):
            f.write(os.urandom(1 << 20))
    size = args.size_mb << 20

    net = None
    if args.rate:
        from ratelimited_net import Net
        net = Net(args.workers, args.rate).up()
    try:
        one, _, _ = fan_out(tmp, src, 1, False, net=net)
        off, off_sent, _ = fan_out(tmp, src, args.workers, False, net=net)
        on, on_sent, moves = fan_out(tmp, src, args.workers, True, args.limit, net=net)
        chain = None
        if args.limit != 1:
            chain, chain_sent, _ = fan_out(tmp, src, args.workers, True, 1, net=net)
    finally:
        if net is not None:
            net.down()
    copies = on_sent / size
    parent = {r["dest"]: r["source"] for r in moves}

    def hops(w):                        # how deep the tree went: hops from the manager
        return 0 if w == "manager" or w not in parent else 1 + hops(parent[w])
    depth = {w: hops(w) for w in parent}
    print("%s" % ("links of %d Mbit/s (namespaces, tc tbf)" % args.rate if args.rate else "all on this machine"))
    print("fan-out of %d MB to %d workers: one worker alone %.2f s; peers off %.2f s, %.1f copies from the manager; "
          "peers on %.2f s, %.1f copies from the manager, %d from workers, tree depth %d"
          % (args.size_mb, args.workers, one, off, off_sent / size, on, copies,
             sum(1 for r in moves if r["source"] != "manager"), max(depth.values(), default=0)))

    if chain is not None:
        print("the same with a source limit of 1 (a chain: each worker serves the next as its copy arrives): "
              "%.2f s, %.1f copies from the manager" % (chain, chain_sent / size))

    via_off, _, t_off = temp_tree(tmp, args.maps, args.temp_mb, args.temp_workers, False)
    via_on, moved_on, t_on = temp_tree(tmp, args.maps, args.temp_mb, args.temp_workers, True)
    print("temps (%d maps x %d MB, reduce tree, %d workers): through the manager %d bytes off (%.1f s), "
          "%d bytes on (%.1f s; %d bytes worker to worker)"
          % (args.maps, args.temp_mb, args.temp_workers, via_off, t_off, via_on, t_on, moved_on))

    ok = source_kill(tmp, src)
    print("source killed mid-transfer: %s" % ("every task succeeded, nothing retried" if ok else "FAILED"))
    print("PEER workers=%d copies_from_manager=%g time_ratio=%.2f temp_bytes_via_manager=%d source_kill_ok=%d"
          % (args.workers, round(copies, 2), on / one, via_on, int(ok)))


if __name__ == "__main__":
    sys.exit(main())
