#!/usr/bin/env python3
# TaskVine style: a script that names its port and TaskVine's constructor arguments.
import vinehpc as vine

m = vine.Manager(9123, name="compat-port", run_info_path="vine-run-info-compat", ssl=True, shutdown=True,
                 init_fn=lambda mgr: mgr.tune("keepalive-interval", 120))
print("listening on port {}".format(m.port))
assert m.name == "compat-port"
# ssl=True: TLS under `vinehpc run`; a pilot keeps its own choice (--ssl), with a warning
assert m.using_ssl == bool(m.tls_fingerprint)
m.enable_peer_transfers()

for i in range(4):
    t = vine.Task("echo hello {}".format(i))
    t.set_cores(1)
    m.submit(t)

seen = []
while not m.empty():
    t = m.wait(5)
    if t:
        assert t.successful(), (t.result, t.reason, t.std_output)
        seen.append(t.std_output.strip())
assert sorted(seen) == ["hello %d" % i for i in range(4)], seen

# a second manager with port=0 gets the run's workers as well (after the first is closed: a pilot
# serves one manager at a time)
m.close()
m2 = vine.Manager(port=0)
t = vine.PythonTask(pow, 2, 10)
m2.submit(t)
t = m2.wait()                        # TaskVine's default: wait until a task finishes
assert t.output == 1024, t.output
m2.close()
print("compat_port_manager: ok")
