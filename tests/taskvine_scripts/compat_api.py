#!/usr/bin/env python3
# TaskVine style: the Manager/Task/File methods TaskVine scripts use beyond submit and wait.
import io
import os
import tarfile
import tempfile
import warnings

import vinehpc as vine

m = vine.Manager(port=9123, name="compat-api")
m.set_name("compat-api-2")
m.set_scheduler("fcfs")
m.disable_peer_transfers()
assert m.tune("keepalive-timeout", 60) == 0
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert m.tune("hungry-minimum", 10) == -1          # TaskVine's knob vinehpc has no setting for
assert any("hungry-minimum" in str(x.message) for x in w)

# Task(command, **task_info), an executable buffer run as ./script.sh, cache="forever", strict_input
script = m.declare_buffer("#!/bin/sh\necho \"script says $GREETING $(cat data/msg.txt)\"\n", cache="forever")
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    payload = b"from the tarball"
    info = tarfile.TarInfo("msg.txt")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
tmp = tempfile.mkdtemp()
with open(os.path.join(tmp, "data.tar.gz"), "wb") as f:
    f.write(buf.getvalue())
untarred = m.declare_untar(m.declare_file(os.path.join(tmp, "data.tar.gz")), cache=True)
out = m.declare_file(os.path.join(tmp, "out.txt"))
t = vine.Task("./script.sh > out.txt", cores=1, memory=100, tag="scripted", category="shell",
              env={"GREETING": "hello"}, inputs={script: "script.sh"}, outputs={out: {"remote_name": "out.txt",
                                                                                      "watch": True}})
t.add_input(untarred, "data", strict_input=True)
m.submit(t)
got = m.wait_for_tag("scripted", 30)
assert got is t and t.successful(), (t.result, t.reason, t.std_output)
assert m.fetch_file(out).strip() == "script says hello from the tarball", m.fetch_file(out)
host, port = t.addrport.rsplit(":", 1)
assert host and int(port) > 0, t.addrport

# a temp made by one task, read back with fetch_file, then undeclared
temp = m.declare_temp()
maker = vine.Task("echo made-on-a-worker > t")
maker.add_output(temp, "t")
m.submit(maker)
assert m.wait_for_task_id(maker.id, 30) is maker and maker.successful(), maker.reason
assert m.fetch_file(temp).strip() == "made-on-a-worker"
m.undeclare_file(temp)
assert m.fetch_file(m.declare_buffer(b"abc")) == "abc"

# cancelling by tag, category, id and all: each comes back from wait() as "cancelled"
by_tag = [vine.Task("sleep 30", tag="doomed") for _ in range(2)]
by_cat = [vine.Task("sleep 30", category="doomed-category") for _ in range(2)]
one, rest = vine.Task("sleep 30"), [vine.Task("sleep 30") for _ in range(2)]
for x in by_tag + by_cat + [one] + rest:
    m.submit(x)
assert m.cancel_by_task_tag("doomed") == 2
assert m.cancel_by_category("doomed-category") == 2
assert m.cancel_by_task_id(one.id) == 1
assert m.cancel_all() == 2
back = []
while not m.empty():
    x = m.wait(10)
    assert x is not None, "a cancelled task did not come back"
    back.append(x)
assert len(back) == 7 and all(x.result == "cancelled" for x in back), [(x.id, x.result) for x in back]
assert m.wait_for_task_id(one.id, 0) is None           # already returned: None at once
m.close()
print("compat_api: ok")
