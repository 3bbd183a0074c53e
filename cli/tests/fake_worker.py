"""A run worker that misbehaves, for the station's supervision tests (cli/tests/worker.rs).

The station starts it as `python3 fake_worker.py MODE` instead of `amicus __run-worker`. It
speaks the worker protocol (runtime/src/worker/protocol.rs: a tag byte, `J` JSON or `B` blob,
a little-endian u64 length, the bytes) as a compromised or crashing worker would: it dies in
every way a process can, breaks the framing, lies in its reports, and floods the station.
"""

import json
import os
import signal
import struct
import sys
import time

MODE = sys.argv[1]
OUT = sys.stdout.buffer


def frame(tag, payload):
    OUT.write(tag + struct.pack("<Q", len(payload)) + payload)
    OUT.flush()


def send(report):
    frame(b"J", json.dumps(report).encode())


def blob(data):
    frame(b"B", data)


def read_job():
    head = sys.stdin.buffer.read(9)
    (length,) = struct.unpack("<Q", head[1:])
    return json.loads(sys.stdin.buffer.read(length))


READY = {
    "report": "ready",
    "confinement": {
        "landlock": "enforced (ABI 7)",
        "seccomp": "enforced",
        "memory_limit_bytes": 1 << 30,
        "cpu_limit_seconds": 60,
        "threads_at_restriction": 1,
        "capabilities_dropped": True,
        "gaps": [],
    },
}


def finished(outcome, outputs, update=None):
    return {
        "report": "finished",
        "outcome": outcome,
        "fuel_used": 1,
        "wall_us": 1,
        "budget_peak_bytes": 1,
        "peak_rss_bytes": 1,
        "log_lines": [["info", "fake"]],
        "dropped_lines": 0,
        "outputs": outputs,
        "update": update,
    }


SUCCEEDED = {"outcome": "succeeded"}


def call(detail, outcome="ok"):
    return {
        "report": "call",
        "call": {
            "capability": "cohort",
            "call": "select",
            "detail": detail,
            "rows": 1,
            "outcome": outcome,
            "count": 1,
        },
    }


job = read_job()

if MODE == "panic-in-setup":
    sys.stderr.write("thread 'main' (1) panicked at src/fake.rs:1:1:\nboom in setup\n")
    sys.exit(101)
if MODE == "hang-in-setup":
    time.sleep(3600)

send(READY)

if MODE == "panic":
    sys.stderr.write("thread 'main' (1) panicked at src/fake.rs:2:2:\nboom while running\n")
    sys.exit(101)
elif MODE == "abort":
    os.abort()
elif MODE == "out-of-memory":
    sys.stderr.write("memory allocation of 1073741824 bytes failed\n")
    sys.stderr.flush()
    os.abort()
elif MODE == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
elif MODE == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
elif MODE == "hang":
    time.sleep(3600)
elif MODE == "exit-quietly":
    sys.exit(0)
elif MODE == "garbage":
    OUT.write(os.urandom(4096))
    OUT.flush()
    time.sleep(3600)
elif MODE == "huge-frame":
    OUT.write(b"J" + struct.pack("<Q", 1 << 40))
    OUT.flush()
    time.sleep(3600)
elif MODE == "truncated":
    OUT.write(b"J" + struct.pack("<Q", 100) + b"{")
    OUT.flush()
    sys.exit(0)
elif MODE == "second-ready":
    send(READY)
    time.sleep(3600)
elif MODE == "undeclared-output":
    send(finished(SUCCEEDED, ["secret.bin"]))
    blob(b"")
    blob(b"patient list")
elif MODE == "oversized-output":
    send(finished(SUCCEEDED, ["summary.json"]))
    blob(b"")
    blob(b"x" * (1 << 20))
elif MODE == "update-output":
    send(finished(SUCCEEDED, ["update"]))
    blob(b"")
    blob(b"AMU\x01")
elif MODE == "update-outside-a-round":
    send(finished(SUCCEEDED, [], {"samples": 1, "values": 1}))
    blob(b"")
    blob(b"AMU\x01")
elif MODE == "station-outcome":
    send(finished({"outcome": "crashed", "detail": "made up"}, []))
    blob(b"")
elif MODE == "more-blobs-than-announced":
    send(finished(SUCCEEDED, ["summary.json"]))
    blob(b"")
    blob(b"{}")
    blob(b"extra")
elif MODE == "flood":
    for i in range(200000):
        send(call(f"query {i} " + "x" * 200))
    time.sleep(3600)
elif MODE == "coalesced-flood":
    for i in range(20000):
        send(call("the same query"))
    send(finished(SUCCEEDED, ["summary.json"]))
    blob(b"")
    blob(b"{}")
elif MODE == "escapes":
    send(call("\x1b[2J\x1b[8mhidden\x1b[0m\rcapabilities (none)\n" + "y" * 100000, "ok\x1b[31m"))
    send(finished(SUCCEEDED, ["summary.json"]))
    blob(b"")
    blob(b"{}")
else:
    sys.stderr.write(f"unknown mode {MODE}\n")
    sys.exit(2)
time.sleep(0.1)
