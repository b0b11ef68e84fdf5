"""How the aggregator and the site agent run Flower's processes: stops passed on, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from fedpriv.deploy import processes


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **kwargs)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stop_is_passed_on_and_a_child_that_ignores_it_is_killed_after_the_grace():
    child = _python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    saved = {signum: signal.getsignal(signum) for signum in processes.STOP_SIGNALS}
    try:
        assert child.stdout.readline().strip() == "ready"
        stop = processes.StopSignals()
        stop.watch(child)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # what `docker stop` sends us
        code = processes.wait(child, stop, grace=1.0)
        assert stop.requested
        assert code == -signal.SIGKILL and time.monotonic() - started < 10
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if child.poll() is None:
            child.kill()


def test_a_child_that_obeys_the_stop_exits_on_its_own():
    child = _python("import time; print('ready', flush=True); time.sleep(60)")
    saved = {signum: signal.getsignal(signum) for signum in processes.STOP_SIGNALS}
    try:
        assert child.stdout.readline().strip() == "ready"
        stop = processes.StopSignals()
        stop.watch(child)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at the terminal: no KeyboardInterrupt, a clean stop
        assert processes.wait(child, stop, grace=30.0) == -signal.SIGTERM
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if child.poll() is None:
            child.kill()


def test_stop_group_ends_the_child_and_everything_it_started():
    child = _python(
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(p.pid, flush=True); time.sleep(60)",
        start_new_session=True,  # as the agent starts the SuperNode
    )
    grandchild = int(child.stdout.readline())
    assert not _gone(grandchild)
    processes.stop_group(child.pid, grace=5.0)
    child.wait(10)
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)


def test_output_passes_through_unchanged_and_its_end_is_kept(capsys):
    child = _python(
        "print('[code: 2004] one'); print('two  spaced\\t'); print('Exit Code: 305')", stderr=subprocess.STDOUT
    )
    output = processes.PassThrough(child, keep=2)
    child.wait(30)
    kept = output.join()
    assert capsys.readouterr().out == "[code: 2004] one\ntwo  spaced\t\nExit Code: 305\n"
    assert kept == "two  spaced\t\nExit Code: 305\n"


def test_flower_commands_come_from_this_environment(tmp_path):
    assert processes.flower_bin("flower-supernode") == os.path.join(os.path.dirname(sys.executable), "flower-supernode")
    env = processes.flower_env(tmp_path / "flwr-home")
    assert env["FLWR_HOME"] == str(tmp_path / "flwr-home") and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
