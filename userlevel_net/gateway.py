"""`vinehpc net gateway`: run the tunnel's egress as its own process (e.g. on a login node).

    vinehpc net gateway --listen 0.0.0.0:9200 --secret-file ~/.vinehpc/secret [--allow '*.cern.ch:1094' ...]
    python -m userlevel_net.gateway ...          (the same, without the vinehpc CLI)

Runs in the foreground until SIGINT/SIGTERM; workers are pointed at HOST:PORT.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from vinehpc.protocol import auth

from . import config
from ._relay import parse_hostport


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--listen", metavar="HOST:PORT", required=True,
                   help="address to accept workers' proxies on (e.g. 0.0.0.0:9200)")
    p.add_argument("--secret-file", metavar="F",
                   help="file holding the run's secret, mode 0600 (default: $VINEHPC_SECRET)")
    p.add_argument("--allow", metavar="PATTERN", action="append", default=None,
                   help="allowed destination: HOST[:PORT] glob (*.cern.ch:1094), CIDR (10.0.0.0/8), "
                        "[V6]:PORT; repeatable; default: allow all")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="timeout of each outbound connect (default 10 s)")
    p.add_argument("--stats-interval", type=float, default=0, metavar="S",
                   help="log the counters every S seconds (default: only at exit)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every stream")
    p.set_defaults(func=main)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `gateway` to the `net` subcommand group."""
    return _configure(subparsers.add_parser(
        "gateway", help="run the tunnel's egress (the side with the network) in the foreground",
        description=__doc__.split("\n\n")[0]))


def main(args) -> int:
    from .egress import Egress
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as e:
        print("vinehpc net gateway: --listen: %s" % e, file=sys.stderr)
        return 2
    try:
        secret = auth.read_secret(args.secret_file) if args.secret_file else config.take_secret()
    except (OSError, ValueError) as e:
        print("vinehpc net gateway: %s" % e, file=sys.stderr)
        return 2
    if not secret:
        print("vinehpc net gateway: no secret: give --secret-file F or set VINEHPC_SECRET", file=sys.stderr)
        return 2
    try:
        eg = Egress(secret, host=host or "0.0.0.0", port=port, allow=args.allow,
                    connect_timeout=args.connect_timeout)
    except ValueError as e:
        print("vinehpc net gateway: --allow: %s" % e, file=sys.stderr)
        return 2
    try:
        eg.start()
    except OSError as e:
        print("vinehpc net gateway: cannot listen on %s: %s" % (args.listen, e), file=sys.stderr)
        return 1
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # the bound address on stdout (port 0 picks one): scripts and tests read it
    print("listening %s:%d" % (eg.host, eg.port), flush=True)
    log = logging.getLogger("vinehpc.tunnel.egress")
    try:
        while not done.wait(args.stats_interval or 3600):
            if args.stats_interval:
                log.info("stats %s", eg.stats)
    finally:
        eg.stop()
        for s, h in old.items():
            signal.signal(s, h)
        log.info("stopped; stats %s", eg.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main(_configure(argparse.ArgumentParser(prog="python -m userlevel_net.gateway",
                                                     description=__doc__.split("\n\n")[0])).parse_args()))
