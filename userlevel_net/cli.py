"""`vinehpc net`: probe, ns, gateway. Parses and calls the library (probe.py, ns.py, gateway.py)."""
from __future__ import annotations

import argparse
import json
import sys


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        v = None
    if v is None or not v > 0:
        raise argparse.ArgumentTypeError("expected a positive number of seconds, got %r" % s)
    return v


def _target(s):
    from .probe import parse_target
    try:
        parse_target(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return s


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `net` (probe, ns, gateway) to the `vinehpc` subcommands."""
    n = subparsers.add_parser("net", help="outbound network access for tasks: probe, namespace runner, gateway",
                              description="User-level networking for compute nodes without outbound access.")
    sub = n.add_subparsers(dest="net_command", metavar="NET_COMMAND")
    sub.required = True

    p = sub.add_parser("probe", help="what this node can reach, and which remedies it can use",
                       description="Probe this node: DNS, direct TCP to each target, proxy variables already set, "
                                   "unprivileged user namespaces, slirp4netns, /dev/net/tun; with a verdict. "
                                   "(Manager.probe_network() runs the same probe on every worker.)")
    p.add_argument("--target", "-t", action="append", default=[], type=_target, metavar="HOST:PORT",
                   help="a destination to test (repeatable; also [IPV6]:PORT or an http(s) URL)")
    p.add_argument("--json", action="store_true", help="print JSON (a list with one object per node)")
    p.add_argument("--timeout", type=_positive_float, default=3.0, metavar="S",
                   help="per DNS lookup and per connect (default 3)")

    s = sub.add_parser("ns", help="run CMD in a user+network namespace connected by slirp4netns",
                       description="Run CMD in a new unprivileged user+network namespace whose connectivity comes "
                                   "from slirp4netns (MTU 65520); for programs that ignore proxy variables. The "
                                   "host's loopback is 10.0.2.2 inside. With --tunnel, the only way out is the "
                                   "tunnel's proxy.",
                       usage="vinehpc net ns [-h] [--tunnel [PORT|URL|env]] [--dns {slirp,host,none}] "
                             "[--mtu N] -- CMD [ARG ...]")
    s.add_argument("--tunnel", nargs="?", const="env", metavar="PORT|URL|env",
                   help="only the tunnel: proxy variables point at 10.0.2.2:PORT (the host's loopback proxy) and "
                        "everything else is blocked. PORT of the proxy on the host's loopback, a proxy URL, or env "
                        "(default: the proxy variables already set, as in a Manager(tunnel=True) task)")
    s.add_argument("--dns", choices=("slirp", "host", "none"), default=None,
                   help="slirp: resolv.conf -> slirp's forwarder 10.0.2.3 (default); host: the host's resolv.conf "
                        "unchanged; none: no DNS in the namespace (default with --tunnel: the proxy resolves)")
    s.add_argument("--mtu", type=int, default=65520, help=argparse.SUPPRESS)
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")

    try:
        from . import gateway
    except ImportError as e:   # built by another part of issue 5; say so rather than break `vinehpc`
        g = sub.add_parser("gateway", help="run the tunnel's egress as its own process (not available here)")
        g.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        g.set_defaults(_gateway_missing=str(e))
    else:
        gateway.add_parser(sub)   # creates `gateway` with its own options
    return n


def main(args) -> int:
    """Run `vinehpc net ...` from parsed args; returns the exit status."""
    cmd = args.net_command
    if cmd == "probe":
        from .probe import probe, render_table
        res = [probe(args.target, timeout=args.timeout)]
        sys.stdout.write(json.dumps(res, indent=2) + "\n" if args.json else render_table(res))
        return 0
    if cmd == "ns":
        from .ns import NsError, run
        argv = list(args.cmd)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if not argv:
            print("vinehpc net ns: no command: vinehpc net ns [options] -- CMD [ARG ...]", file=sys.stderr)
            return 2
        try:
            return run(argv, tunnel=args.tunnel, dns=args.dns, mtu=args.mtu)
        except NsError as e:
            print("vinehpc net ns: %s" % e, file=sys.stderr)
            return 125
    if cmd == "gateway":
        if getattr(args, "_gateway_missing", False):
            print("vinehpc net gateway: not available in this installation (%s)" % args._gateway_missing,
                  file=sys.stderr)
            return 2
        from . import gateway
        return gateway.main(args)
    raise AssertionError(cmd)
