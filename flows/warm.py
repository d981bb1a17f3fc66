"""The warm runner: commands that start without importing anything.

A ``voxelflow`` command spends about a second importing Prefect, voxelflow, pyarrow and pandas
before it does any work, and half a second tearing its modules down at exit: on one study,
more than the conversion itself (README, "Small runs"). ``voxelflow server start`` therefore
leaves a second process beside the Prefect server, this module's :func:`serve`, which has
imported all that once and forks a child for each command. The ``voxelflow`` process becomes a
thin client (:func:`run_warm`): it hands the runner its arguments, working directory,
environment and its terminal (the file descriptors themselves, over a Unix socket), forwards
Ctrl-C and other signals to the child, and exits with the child's status. The child is a fresh
process in all that a command can see: its own pid, environment, directory and terminal.

The runner serves only commands whose environment it was started with (shell bookkeeping such
as ``PWD`` aside) and whose source files are the ones it imported: any other command runs in
its own process as before, and a runner whose sources changed starts itself again.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "models", "voxelflow")
SOCKET_NAME = "warm.sock"
STATE_NAME = "warm.json"
LOG_NAME = "warm.log"
# commands that manage the runner itself or outlive any command (a scheduler)
NOT_WARM = {"server", "serve"}
# variables a shell changes from one command to the next, and ones voxelflow sets itself before
# reading them (the API URL is read again by each command)
VOLATILE = {"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "PREFECT_API_URL", "PREFECT_LOGGING_CONFIG_PATH",
            "DASK_LOGGING__DISTRIBUTED"}
# set by voxelflow when absent (voxelflow/__init__.py): absent and this value are the same
DEFAULTS = {"ARROW_DEFAULT_MEMORY_POOL": "system"}
# what the runner imports once: everything a small ingest and the commands' start need
PRELOAD = ("flows.cli", "flows.ingest", "flows.terminal", "flows.runner", "voxelflow.ingest", "voxelflow.query",
           "pandas", "duckdb", "pyarrow.parquet", "prefect.flow_engine", "prefect.task_engine",
           "prefect.client.orchestration", "prefect.utilities.visualization", "fastapi.encoders", "rich.progress",
           "rich.table")


def runner_home() -> Path:
    from voxelflow.deid import voxelflow_home

    return voxelflow_home()


def sources_stamp() -> str:
    """A digest of the path, size and modification time of every Python source of voxelflow's
    packages (a few ms: ~200 stats)."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def environment_stamp(env: dict[str, str]) -> str:
    """A digest of the interpreter and of ``env`` without :data:`VOLATILE` variables."""
    relevant = {**DEFAULTS, **{k: v for k, v in env.items() if k not in VOLATILE}}
    return hashlib.sha256(json.dumps([sys.executable, sorted(relevant.items())]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- the client

def run_warm(argv: list[str], home: Path | None = None) -> int | None:
    """Run the command ``argv`` in a child of this environment's warm runner; its exit status,
    or None when no runner serves it here (none is up, it runs another environment or older
    sources, or the command is one of :data:`NOT_WARM`): the caller then runs it itself."""
    if not argv or argv[0] in NOT_WARM or argv[0].startswith("-"):
        return None
    path = (home or runner_home()) / SOCKET_NAME
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5.0)
        conn.connect(str(path))
        header = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                  "environment": environment_stamp(dict(os.environ)), "sources": sources_stamp()}
        socket.send_fds(conn, [b"V"], [0, 1, 2])
        conn.sendall(json.dumps(header).encode() + b"\n")
        reader = conn.makefile("rb")
        first = json.loads(reader.readline() or b"{}")
    except (OSError, ValueError):
        conn.close()
        return None  # a runner that died or hangs: the command runs here
    if "pid" not in first:
        conn.close()
        return None  # refused: another environment, other sources
    pid = first["pid"]
    conn.settimeout(None)  # a command runs as long as it needs

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    line = reader.readline()  # the exit status; a signal forwarded meanwhile does not end the wait (PEP 475)
    conn.close()
    try:
        return int(json.loads(line)["rc"])
    except (ValueError, KeyError):
        print(f"voxelflow: the command's process (pid {pid}, a child of the warm runner) ended without an exit "
              f"status; see {(home or runner_home()) / LOG_NAME}", file=sys.stderr)
        return 1


def fast_exit(rc: int | None) -> None:
    """End this process with ``rc`` after its exit handlers (Prefect's log and event flushes
    among them), without tearing down every module and object one by one (half a second after
    a flow run: README, "Small runs")."""
    code = rc if isinstance(rc, int) else (0 if rc is None else 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    atexit._run_exitfuncs()
    os._exit(code)


# ---------------------------------------------------------------------------------- the runner

def start(home: Path | None = None, timeout: float = 60.0, wait: bool = True) -> int | None:
    """Start this environment's warm runner in ``home`` (or find it running); its pid, or None
    when it did not come up in ``timeout`` s (its log says why). ``wait=False``: return the new
    process's pid at once (it serves commands about two seconds later)."""
    home = home or runner_home()
    running = status(home)
    if running and running["environment"] == environment_stamp(dict(os.environ)):
        return running["pid"]
    stop(home)  # one runner per home: an older environment's makes way
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VOXELFLOW_HOME": str(home)}
    with open(home / LOG_NAME, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.warm"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
    if not wait:
        return proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        running = status(home)
        if running and running["pid"] == proc.pid:
            return proc.pid
        time.sleep(0.1)
    return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (reaping it first if it is this process's ended child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not this process's child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(home: Path | None = None) -> dict | None:
    """The running warm runner's state (pid, environment and sources stamps), or None."""
    home = home or runner_home()
    try:
        state = json.loads((home / STATE_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state if alive(state["pid"]) and (home / SOCKET_NAME).exists() else None


def stop(home: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the warm runner of ``home``; whether one was running. Commands running in its
    children go on."""
    home = home or runner_home()
    state = status(home)
    if state is None:
        return False
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(state["pid"]):
            return True
        time.sleep(0.05)
    os.kill(state["pid"], signal.SIGKILL)
    return True


def serve(home: Path) -> None:
    """The runner's loop: import :data:`PRELOAD`, listen on ``home/warm.sock``, fork a child
    per accepted command; until SIGTERM, or until its sources change (it then starts again)."""
    import threading

    environment = environment_stamp(dict(os.environ))  # before imports set defaults
    for module in PRELOAD:
        __import__(module)
    import pyarrow as pa

    pa.array(["x"])  # pyarrow looks for pandas on its first array: done here, not per command
    from flows.terminal import reconfigure_prefect_logging

    reconfigure_prefect_logging()  # its first call builds Prefect's settings models (0.2 s): here, once
    if threading.active_count() > 1:  # a fork copies one thread: locks others hold stay held
        raise RuntimeError(f"threads running after the imports, cannot fork: {threading.enumerate()}")
    sources = sources_stamp()
    path = home / SOCKET_NAME
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket runs commands as this user: this user's only
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    listener.settimeout(1.0)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    (home / STATE_NAME).write_text(json.dumps({"pid": os.getpid(), "environment": environment,
                                               "sources": sources}))
    print(f"warm runner pid {os.getpid()} on {path} (environment {environment}, sources {sources})", flush=True)
    restart = False
    try:
        while not stopping and not restart:
            _reap()
            try:
                conn, _ = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            restart = _handle(conn, listener, environment, sources)
    finally:
        listener.close()
        state = status(home)
        if state and state["pid"] == os.getpid():  # not a successor's files
            path.unlink(missing_ok=True)
            (home / STATE_NAME).unlink(missing_ok=True)
    if restart:
        print("sources changed: starting again", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "flows.warm"])


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _handle(conn: socket.socket, listener: socket.socket, environment: str, sources: str) -> bool:
    """Fork a child for the command on ``conn``, or refuse it; whether the runner must start
    again (its sources changed)."""
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        header = json.loads(conn.makefile("rb").readline())
        if header["sources"] != sources or header["environment"] != environment:
            why = "sources changed" if header["sources"] != sources else "another environment"
            conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
            return header["sources"] != sources
        if len(fds) != 3:
            raise ValueError(f"expected the client's 3 standard streams, got {len(fds)} descriptors")
        pid = os.fork()
        if pid == 0:
            listener.close()
            _child(conn, fds, header)  # never returns
        print(f"{time.strftime('%H:%M:%S')} pid {pid}: voxelflow {' '.join(header['argv'])}", flush=True)
        return False
    except (OSError, ValueError, KeyError) as exc:
        print(f"{time.strftime('%H:%M:%S')} a client's request failed: {type(exc).__name__}: {exc}", flush=True)
        return False
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _child(conn: socket.socket, fds: list[int], header: dict) -> None:
    """Become the command's process: the client's streams, directory, environment and
    arguments; report the pid and at the end the exit status to the client."""
    rc = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setpgid(0, 0)  # its own group: a signal to the runner's group does not reach it
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(header["cwd"])
        os.environ.clear()
        os.environ.update({**DEFAULTS, **header["env"]})
        sys.argv = ["voxelflow", *header["argv"]]
        conn.settimeout(None)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        from flows.cli import FLOW_COMMANDS, main
        from flows.terminal import reconfigure_prefect_logging

        if header["argv"][0] not in FLOW_COMMANDS:  # those configure it themselves (quiet_logging)
            reconfigure_prefect_logging()  # else Prefect's console handler writes to the runner's log
        rc = main(header["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # before main() could catch it
        rc = 130
    except BaseException:  # noqa: BLE001 - the client must hear how its command ended
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        try:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            atexit._run_exitfuncs()
            conn.sendall(json.dumps({"rc": rc if isinstance(rc, int) else 1}).encode() + b"\n")
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


if __name__ == "__main__":
    serve(runner_home())
