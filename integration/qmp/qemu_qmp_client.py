#!/usr/bin/env python3
"""Checks a QMP server with QEMU's own Python client library (PyPI: qemu.qmp).

Usage: qemu_qmp_client.py SOCKET_PATH

The library connects, reads the greeting and negotiates capabilities itself. Then:
query-status; stop (expect STOP and "paused") and cont (expect RESUME and "running"),
in the other order if the VM starts paused; an unknown command (expect CommandNotFound).
Prints one line per check. Exit status: 0 when all hold, 1 on any mismatch or error,
2 on bad usage or a missing qemu.qmp.
"""

import asyncio
import sys
import traceback

try:
    from qemu.qmp import EventListener, ExecuteError, QMPClient
except ImportError:
    print("qemu.qmp is not installed: pip install qemu.qmp", file=sys.stderr)
    sys.exit(2)

TIMEOUT = 10.0


class Mismatch(Exception):
    """A reply or event that is not what QEMU would send."""


def expect(condition, what):
    if not condition:
        raise Mismatch(what)
    print(f"ok: {what}", flush=True)


async def bounded(awaitable):
    return await asyncio.wait_for(awaitable, TIMEOUT)


async def query_status(qmp):
    status = await bounded(qmp.execute("query-status"))
    print(f"query-status -> {status}", flush=True)
    expect(isinstance(status, dict), "query-status returns an object")
    expect(status.get("status") in ("running", "paused"), "status is running or paused")
    expect(status.get("running") == (status["status"] == "running"), "'running' agrees with 'status'")
    expect(status.get("singlestep") is False, "'singlestep' is false")
    return status["status"]


async def transition(qmp, listener, command, event, status_after):
    reply = await bounded(qmp.execute(command))
    expect(reply == {}, f"{command} returns {{}}")
    message = await bounded(listener.get())
    print(f"event -> {dict(message)}", flush=True)
    expect(message["event"] == event, f"{command} emits {event}")
    timestamp = message.get("timestamp", {})
    expect(
        isinstance(timestamp.get("seconds"), int) and isinstance(timestamp.get("microseconds"), int),
        f"{event} has a timestamp",
    )
    expect(await query_status(qmp) == status_after, f"status is {status_after} after {command}")


async def run(path):
    qmp = QMPClient("ferry-check")
    await bounded(qmp.connect(path))
    try:
        version = qmp.greeting.QMP.version
        print(f"greeting version -> {dict(version)}", flush=True)
        expect(str(version.get("package", "")).startswith("ferry "), "greeting names ferry")
        expect(set(version.get("qemu", {})) == {"major", "minor", "micro"}, "greeting has a version triple")

        listener = EventListener(("STOP", "RESUME"))
        with qmp.listen(listener):
            if await query_status(qmp) == "running":
                await transition(qmp, listener, "stop", "STOP", "paused")
                await transition(qmp, listener, "cont", "RESUME", "running")
            else:
                await transition(qmp, listener, "cont", "RESUME", "running")
                await transition(qmp, listener, "stop", "STOP", "paused")

        try:
            await bounded(qmp.execute("ferry-no-such-command"))
            expect(False, "an unknown command fails")
        except ExecuteError as err:
            print(f"unknown command -> {err.error_class}: {err}", flush=True)
            expect(err.error_class == "CommandNotFound", "an unknown command is CommandNotFound")
    finally:
        await qmp.disconnect()


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        asyncio.run(run(sys.argv[1]))
    except Mismatch as mismatch:
        print(f"MISMATCH: {mismatch}", flush=True)
        return 1
    except Exception as err:  # the library's errors, timeouts, a refused connection
        print(f"FAILED: {type(err).__name__}: {err}", flush=True)
        traceback.print_exc()
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
