"""The `vinehpc` command: run, pilot, worker (+ audit, sysimage, net from the leaves).

On top of everything: nothing imports this module but vinehpc/__main__.py.  Each subcommand
parses, reads the environment once (config.Settings.from_env) and calls a library function."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _int_at_least(low, what):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError("expected a %s integer, got %r" % (what, s))
        return v
    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vinehpc", description="Many-task workloads on HPC allocations.")
    p.add_argument("--version", action="version", version="vinehpc " + _version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a tasks.py with local workers",
                       description="Run SCRIPT as __main__; every vinehpc.Manager()/Executor() it creates gets "
                                   "WORKERS local worker processes.")
    r.add_argument("-n", "--workers", type=_positive_int, default=None,
                   help="number of local workers (default: one per core)")
    r.add_argument("--cores-per-worker", type=_positive_int, default=1, metavar="C",
                   help="cores each local worker offers (default 1); memory and disk are shared among the workers")
    r.add_argument("--tunnel", action="store_true",
                   help="tasks reach the outside through the manager (proxy variables; see vinehpc net)")
    r.add_argument("--ssl", action="store_true",
                   help="TLS between the manager and its workers (default $VINEHPC_SSL; Manager(ssl=True) in the "
                        "script does the same)")
    r.add_argument("--metrics-port", type=_nonneg_int, metavar="N",
                   help="serve the run's figures as Prometheus metrics on 127.0.0.1:N/metrics (needs prometheus_client)")
    r.add_argument("--progress", choices=("auto", "always", "never"), default=None,
                   help="progress on stderr (default auto: a line redrawn on a terminal, else a line a minute "
                        "($VINEHPC_PROGRESS_INTERVAL s); always: the redrawn line; never: none)")
    r.add_argument("script")
    r.add_argument("args", nargs=argparse.REMAINDER)

    pl = sub.add_parser("pilot", help="run a tasks.py as a pilot job inside an allocation (under srun/mpiexec)",
                        description="Under MPI (srun --mpi=pmi2, mpiexec): rank 0 runs SCRIPT with the manager; the "
                                    "other ranks start workers sized from the allocation. MPI is used only to meet.")
    pl.add_argument("--workers-per-node", type=_positive_int, metavar="N",
                    help="workers on each node (default: one per MPI rank)")
    pl.add_argument("--cores-per-worker", type=_positive_int, metavar="C",
                    help="default: the rank's CPUs (--cpus-per-task) divided among its workers")
    pl.add_argument("--manager-node-works", action="store_true",
                    help="also start workers on the manager's node (rank 0)")
    pl.add_argument("--run-dir", help="default: ./vine-run-info/pilot-<script>; the same dir resumes a run")
    pl.add_argument("--port", type=_nonneg_int, default=0, help="manager port (default: any free port)")
    pl.add_argument("--grace", type=float, metavar="S",
                    help="seconds running tasks get after the walltime warning (default $VINEHPC_GRACE or 60)")
    pl.add_argument("--image", metavar="ENV.vimg",
                    help="environment image (vinehpc sysimage): read once, broadcast to every node, unpacked "
                         "node-local; all tasks run inside it")
    pl.add_argument("--ssl", action="store_true",
                    help="TLS between the manager and its workers, with a certificate made for the run "
                         "(default $VINEHPC_SSL); its fingerprint is in the contact file")
    pl.add_argument("--tunnel", action="store_true",
                    help="tasks reach the outside through the manager's node (compute nodes without outbound access)")
    pl.add_argument("--tunnel-gateway", metavar="HOST:PORT",
                    help="... through a `vinehpc net gateway` there instead")
    pl.add_argument("script")
    pl.add_argument("args", nargs=argparse.REMAINDER)

    w = sub.add_parser("worker", help="join a running manager",
                       description="Connect to the manager at HOST:PORT (or the one in a pilot's contact file) "
                                   "and run its tasks.")
    w.add_argument("address", metavar="HOST:PORT", nargs="?")
    w.add_argument("--contact", metavar="FILE", help="a pilot's contact file (RUN_DIR/contact.json)")
    w.add_argument("--cores", type=_positive_int,
                   help="cores offered to tasks (default: every CPU this process may use)")
    w.add_argument("--memory", type=_nonneg_int, help="MB (default: all of this machine's)")
    w.add_argument("--disk", type=_nonneg_int, help="MB (default: free space of the work dir)")
    w.add_argument("--gpus", type=_nonneg_int,
                   help="GPUs offered (default: those detected; tasks get theirs in CUDA_VISIBLE_DEVICES)")
    w.add_argument("--secret-file", metavar="F", help="file holding the run's secret (default: $VINEHPC_SECRET)")
    w.add_argument("--tls-fingerprint", metavar="SHA256",
                   help="the manager's TLS certificate fingerprint, for a manager with ssl (default: "
                        "$VINEHPC_TLS_FINGERPRINT, the contact file's, or the tls-fingerprint file beside --secret-file)")
    w.add_argument("--workdir", help="cache, sandboxes and the worker's log (default: a fresh directory in "
                                     "$VINEHPC_WORKER_DIR, else $TMPDIR or /tmp, removed at exit; local workers "
                                     "of `vinehpc run`/Manager(local_workers=) use /dev/shm when it has room)")
    w.add_argument("--connect-timeout", type=float, default=60.0, metavar="S",
                   help="give up after S seconds without reaching the manager (default 60)")
    w.add_argument("--image", metavar="ENV.vimg", help="run every task inside this environment image")
    w.add_argument("--no-reconnect", action="store_true", help="exit when the manager connection ends")
    w.add_argument("--unix", metavar="PATH",
                   help="reach the manager through this Unix socket on its machine instead of TCP (local "
                        "workers: a local run's manager listens on RUN_DIR/workers.sock; @NAME: Linux's abstract "
                        "namespace); HOST:PORT is still the manager's address for the tunnel and the logs")
    w.add_argument("--exit-on-refused", action="store_true",
                   help="exit at once when the manager refuses connections (a pilot's workers: the run is over)")
    w.add_argument("--log-dir", metavar="DIR",
                   help="copy the worker's log (WORKDIR/worker.log) to DIR/HOST-PID.log when it exits (launchers "
                        "pass RUN_DIR/workers)")
    w.add_argument("-v", "--verbose", action="store_true",
                   help="log what the worker does (connections, sessions, failed tasks) on stderr too")

    d = sub.add_parser("drain", help="ask a run to stop dispatching and exit resumable (what the walltime warning does)",
                       description="Stop dispatching, give running tasks a grace, record what completed, exit "
                                   "RESUMABLE (75). Authenticated through the run directory (see vinehpc/drain.py).")
    d.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (a pilot's: vine-run-info/pilot-<script>)")
    d.add_argument("--grace", type=float, metavar="S", help="seconds running tasks get (default: the run's)")
    d.add_argument("--job", metavar="ID", help="the Slurm job it is for: the request waits for that job's manager "
                                               "(vine.sh passes its own); without it, only a run already going acts")
    d.add_argument("--why", default="user", help="said in the run's output (vine.sh: the signal's name)")

    rp = sub.add_parser("report", help="where a run's time went: an HTML report with plots, or a summary",
                        description="Read RUN_DIR/transactions.jsonl (one pass; a killed run's torn last line is "
                                    "skipped) and write one self-contained HTML file (inline plots, no network: "
                                    "copy it anywhere and open it), or print a summary with --text / --json. "
                                    "The HTML needs matplotlib (pip install 'vinehpc[report]').")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (vine-run-info/<run>) or its transactions.jsonl")
    rp.add_argument("-o", "--output", metavar="FILE.html",
                    help="where to write the HTML (default: RUN_DIR/report.html; with --text/--json: none unless given)")
    rp.add_argument("--text", action="store_true", help="print a plain-text summary")
    rp.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    st = sub.add_parser("status", help="what a run is doing: workers, tasks, throughput, losses (live or from its log)",
                        description="Ask a running manager for its figures (authenticated with the run's secret), or "
                                    "read them from the run directory's log once the manager is gone.")
    st.add_argument("target", nargs="?", metavar="RUN_DIR | contact.json | HOST:PORT",
                    help="default: the newest run directory under ./vine-run-info ($VINEHPC_RUN_DIR)")
    st.add_argument("--json", action="store_true", help="the whole snapshot as JSON, for scripts")
    st.add_argument("--watch", action="store_true", help="redraw every --interval seconds (Ctrl-C to stop)")
    st.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between redraws (default 2)")
    st.add_argument("--count", type=_positive_int, metavar="N", help="with --watch: stop after N views")
    st.add_argument("--secret-file", metavar="F",
                    help="the run's secret (default: RUN_DIR/secret, the contact file's, or $VINEHPC_SECRET)")
    st.add_argument("--tls-fingerprint", metavar="SHA256",
                    help="a manager with ssl: its certificate's fingerprint (default: RUN_DIR/tls-fingerprint, the "
                         "contact file's, or $VINEHPC_TLS_FINGERPRINT)")
    lg = sub.add_parser("logs", help="a task's story or a worker's log, from a run directory",
                        description="From RUN_DIR alone (also after the run): --task ID shows the task's command, "
                                    "attempts, workers, result, the end of its output and its workers' log lines "
                                    "around it; --worker ID a worker's log; neither: the workers and where their "
                                    "logs are.")
    lg.add_argument("run_dir", metavar="RUN_DIR")
    lg.add_argument("--task", type=_nonneg_int, metavar="ID")
    lg.add_argument("--worker", type=_nonneg_int, metavar="ID")

    from sysimage_tools.audit.cli import add_parser as add_audit_parser
    add_audit_parser(sub)

    from sysimage_tools.cli import add_parser as add_sysimage_parser
    add_sysimage_parser(sub)

    from userlevel_net.cli import add_parser as add_net_parser
    add_net_parser(sub)
    return p


def _version():
    from . import __version__
    return __version__


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:       # bare `vinehpc`: what it can do, not an error
        p.print_help()
        return 0
    if args.command == "logs":
        from .logs import cli as cmd_logs
        return cmd_logs(args.run_dir, task=args.task, worker=args.worker)
    if args.command == "audit":
        from sysimage_tools.audit.cli import cmd_audit
        return cmd_audit(args)
    if args.command == "sysimage":
        from sysimage_tools.cli import main as cmd_sysimage
        return cmd_sysimage(args)
    if args.command == "net":
        from userlevel_net.cli import main as cmd_net
        return cmd_net(args)
    if args.command == "drain":
        from .drain import cli as cmd_drain
        return cmd_drain(args.run_dir, grace=args.grace, job=args.job, why=args.why)
    return {"run": cmd_run, "worker": cmd_worker, "pilot": cmd_pilot, "report": cmd_report, "status": cmd_status}[args.command](args)


def cmd_report(args) -> int:
    from .report import ReportError, report
    try:
        path = report(args.run_dir, output=args.output, text=args.text, as_json=args.json, out=sys.stdout)
    except ReportError as e:
        print("vinehpc report: %s" % e, file=sys.stderr)
        return 2
    if path is not None:
        print("vinehpc report: wrote %s" % path, file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from launcher.contact import read_contact_tls
    from .status_client import main as status_main
    settings = _settings("status")
    if settings is None:
        return 2
    return status_main(args.target, as_json=args.json, watch=args.watch, interval=args.interval, count=args.count,
                       secret_file=args.secret_file, env_secret=settings.secret, run_root=settings.run_dir_root,
                       read_contact=read_contact_tls,
                       tls_fingerprint=args.tls_fingerprint or settings.tls_fingerprint)


def _settings(command):
    """The environment's Settings, or None after saying what is wrong with it."""
    from .config import Settings
    try:
        return Settings.from_env()
    except ValueError as e:
        print("vinehpc %s: %s" % (command, e), file=sys.stderr)
        return None


def cmd_pilot(args) -> int:
    import importlib.util
    if importlib.util.find_spec("mpi4py") is None:
        print("vinehpc pilot: mpi4py is not installed: pip install mpi4py (and an MPI: pip install mpich, "
              "or your site's module)", file=sys.stderr)
        return 2
    settings = _settings("pilot")
    if settings is None:
        return 2
    from launcher import pilot
    logging.basicConfig(level=logging.WARNING, format="vinehpc pilot: %(message)s")
    return pilot.main(args.script, args.args, settings, workers_per_node=args.workers_per_node,
                      cores_per_worker=args.cores_per_worker, manager_node_works=args.manager_node_works,
                      run_dir=args.run_dir, port=args.port, grace=args.grace, image=args.image,
                      tunnel=args.tunnel_gateway or args.tunnel or None, ssl=args.ssl or settings.ssl)


def cmd_worker(args) -> int:
    from .protocol import auth
    from .worker.main import main as worker_main
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vinehpc worker %(process)d: %(message)s")
    for h in logging.getLogger().handlers:      # the log file gets INFO (worker/logfile.py); stderr less
        h.setLevel(logging.INFO if args.verbose else logging.WARNING)
    settings = _settings("worker")
    if settings is None:
        return 2
    os.environ.pop("VINEHPC_SECRET", None)      # the tasks this worker starts must not inherit the secret
    os.environ.pop("VINEHPC_TLS_FINGERPRINT", None)     # nor this manager's pin (a task's own manager has another)
    fingerprint = args.tls_fingerprint or settings.tls_fingerprint
    if args.contact:
        from launcher.contact import read_contact_tls
        try:
            address, secret, in_contact = read_contact_tls(args.contact)
            fingerprint = fingerprint or in_contact
        except (OSError, ValueError, KeyError) as e:
            print("vinehpc worker: cannot read the contact file: %s" % e, file=sys.stderr)
            return 2
        if args.address is None:
            args.address = address
    elif args.address is None:
        print("vinehpc worker: give the manager as HOST:PORT, or --contact FILE", file=sys.stderr)
        return 2
    elif args.secret_file:
        try:
            secret = auth.read_secret(args.secret_file)
            fingerprint = fingerprint or _fingerprint_beside(args.secret_file)
        except (OSError, ValueError) as e:
            print("vinehpc worker: cannot read the secret: %s" % e, file=sys.stderr)
            return 2
    else:
        secret = settings.secret
        if not secret:
            print("vinehpc worker: no secret: pass --secret-file FILE (the manager writes it to its run directory, "
                  "vine-run-info/<run>/secret) or set VINEHPC_SECRET", file=sys.stderr)
            return 2
    try:
        return worker_main(args.address, secret, cores=args.cores, memory=args.memory, disk=args.disk,
                           gpus=args.gpus, workdir=args.workdir, connect_timeout=args.connect_timeout,
                           reconnect=not args.no_reconnect, exit_on_refused=args.exit_on_refused,
                           image=args.image, settings=settings, log_dir=args.log_dir, tls_fingerprint=fingerprint,
                           unix=args.unix)
    except ValueError as e:
        print("vinehpc worker: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _fingerprint_beside(secret_file):
    """The manager writes its TLS fingerprint beside its secret (RUN_DIR/tls-fingerprint): a
    worker given the secret file finds it there. None: that run has no TLS."""
    from .protocol import tls
    path = os.path.join(os.path.dirname(os.path.abspath(secret_file)), tls.FINGERPRINT_FILE)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def cmd_run(args) -> int:
    from launcher.local import LocalRun
    from .script import run_script
    script = args.script
    if not os.path.isfile(script):
        print("vinehpc run: no such file: %s" % script, file=sys.stderr)
        return 2
    settings = _settings("run")
    if settings is None:
        return 2
    mode = args.progress or settings.progress
    # a terminal gets a live line; a log (not a terminal) a line every settings.progress_interval s
    live = mode == "always" or (mode == "auto" and sys.stderr.isatty())
    progress = "live" if live else ("lines" if mode == "auto" else None)
    workers = args.workers or len(os.sched_getaffinity(0))
    return run_script(script, args.args, LocalRun(workers, args.cores_per_worker, settings, progress=progress,
                                                  tunnel=args.tunnel, metrics_port=args.metrics_port,
                                                  ssl=args.ssl or settings.ssl))


if __name__ == "__main__":
    sys.exit(main())
