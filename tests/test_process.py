"""The service as a platform runs it: uvicorn started from the Procfile's web: line, stopped by signals."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from service.lifecycle import CLOSED, CLOSING, STARTED, STARTING
from tests.conftest import postgres_connections, redis_clients, redis_prefix, wait_until
from tests.procfile import ROOT, STOPPED, Service, free_port, procfile_command

pytestmark = pytest.mark.process


@pytest.fixture
def started(service_env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    service = Service(service_env, tmp_path / "service.log")
    try:
        yield service
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()


def test_sigterm_exits_cleanly_and_leaves_no_connection(started: Service, postgres_url: str, applicant: dict) -> None:
    ready_after = started.wait_ready()
    created = httpx.post(f"{started.url}/decisions", json=applicant, timeout=5)
    assert created.status_code == 201
    assert postgres_connections(postgres_url, started.app_name) >= 1
    assert redis_clients(started.app_name) >= 1

    code, seconds = started.stop(signal.SIGTERM)
    log = started.log()
    # 143: the SIGTERM uvicorn raises again after a clean shutdown, caught to remove the metrics directory.
    assert code in STOPPED, log
    assert seconds < 10
    for line in (STARTING, STARTED, CLOSING, CLOSED):
        assert line in log
    assert (
        log.index(CLOSING)
        < log.index("Received SIGTERM")
        < log.index("Shutdown step 'store': closed")
        < log.index(CLOSED)
    )
    assert "Traceback" not in log
    assert wait_until(lambda: postgres_connections(postgres_url, started.app_name) == 0)
    assert wait_until(lambda: redis_clients(started.app_name) == 0)
    print(f"start to ready {ready_after:.2f} s, SIGTERM to exit {seconds:.2f} s")


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_service_leaves_no_temporary_directory(
    service_env: dict[str, str], tmp_path: Path, workers: str, sig: signal.Signals
) -> None:
    """The multiprocess metrics directory the service makes for itself goes when it stops, however it stops."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {k: v for k, v in service_env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    # One left by a process killed outright: its pid is gone, so this start removes it.
    orphan = temporary / f"credit-scoring-metrics-{_dead_pid()}-abc123"
    orphan.mkdir()
    (orphan / "counter_1.db").write_bytes(b"")
    service = Service({**env, "TMPDIR": str(temporary), "WEB_CONCURRENCY": workers}, tmp_path / "service.log")
    try:
        service.wait_ready()
        made = list(temporary.iterdir())
        assert [p.name.startswith(f"credit-scoring-metrics-{service.process.pid}-") for p in made] == [True], made
        assert any(made[0].iterdir()), "the workers write their metrics there"
        exited, _ = service.stop(sig)
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
    assert exited in (0, 128 + sig), service.log()  # never -sig: the default action would skip the clean-up
    assert list(temporary.iterdir()) == [], service.log()
    assert "Traceback" not in service.log()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_sigkill_loses_no_committed_decision(
    started: Service, service_env: dict[str, str], tmp_path: Path, postgres_url: str, applicant: dict
) -> None:
    started.wait_ready()
    created = [httpx.post(f"{started.url}/decisions", json=applicant, timeout=5) for _ in range(5)]
    assert all(r.status_code == 201 for r in created)
    code, _ = started.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert CLOSING not in started.log()

    # Restart with an empty cache (a fresh key prefix), so reads must come from PostgreSQL.
    restarted = Service(
        {**service_env, "REDIS_KEY_PREFIX": f"{redis_prefix()}{uuid.uuid4().hex}:"}, tmp_path / "again.log"
    )
    try:
        restarted.wait_ready()
        for response in created:
            again = httpx.get(f"{restarted.url}{response.headers['location']}", timeout=5)
            assert again.status_code == 200
            assert again.json() == response.json()
        code, _ = restarted.stop(signal.SIGTERM)
        assert code in STOPPED
        assert CLOSED in restarted.log()
    finally:
        if restarted.process.poll() is None:
            restarted.process.kill()
            restarted.process.wait()
    assert wait_until(lambda: postgres_connections(postgres_url, restarted.app_name) == 0)


def test_release_phase_migrates(service_env: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", "-c", procfile_command("release")],
        cwd=ROOT,
        env=service_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Schema up to date" in result.stderr


def test_json_log_format_holds_from_first_line_to_last(service_env: dict[str, str], tmp_path: Path) -> None:
    service = Service({**service_env, "LOG_FORMAT": "json"}, tmp_path / "json.log")
    try:
        service.wait_ready()
        httpx.get(f"{service.url}/health/live", headers={"X-Request-ID": "json-1"}, timeout=5)
        service.stop(signal.SIGTERM)
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
    entries = [json.loads(line) for line in service.log().splitlines()]
    messages = [e["message"] for e in entries]
    assert messages[0].startswith("Started server process")
    assert STARTING in messages and CLOSED in messages
    assert any(e["request_id"] == "json-1" and e["logger"] == "service.access" for e in entries)


def test_bad_configuration_exits_nonzero_with_one_clear_line(service_env: dict[str, str], tmp_path: Path) -> None:
    service = Service({**service_env, "LOG_LEVEL": "LOUD"}, tmp_path / "bad.log")
    code = service.process.wait(30)
    log = service.log()
    assert code != 0
    assert "Startup step 'settings' failed" in log and "LOG_LEVEL must be one of" in log
    assert "Traceback" not in log
    assert STARTED not in log


def test_kubernetes_command_makes_uvicorn_pid_of_the_container(service_env: dict[str, str], tmp_path: Path) -> None:
    """The manifest's command must exec uvicorn itself (`python -m service.web`), or SIGTERM would stop at a shell."""
    import yaml

    manifest = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    command = manifest["spec"]["template"]["spec"]["containers"][0]["command"]
    port = free_port()
    with (tmp_path / "k8s.log").open("ab") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**service_env, "PORT": str(port)}, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        assert wait_until(lambda: _ready(port), timeout=30)
        assert b"service.web\x00service.app:app" in Path(f"/proc/{process.pid}/cmdline").read_bytes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in STOPPED
        assert "Successfully closed API." in (tmp_path / "k8s.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_with_a_shutdown_delay_sigterm_makes_it_unready_but_it_serves_until_the_delay_ends(
    service_env: dict[str, str], tmp_path: Path, applicant: dict
) -> None:
    """What a load balancer that checks readiness needs: time to take the replica out before its listener closes."""
    service = Service({**service_env, "SHUTDOWN_DELAY": "2"}, tmp_path / "delay.log")
    try:
        service.wait_ready()
        service.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: httpx.get(f"{service.url}/health/ready", timeout=2).status_code == 503, 1.0)
        # Unready, and still serving on new connections: the balancer has not taken it out yet.
        answered = httpx.post(f"{service.url}/decisions", json=applicant, timeout=5)
        assert answered.status_code == 201, answered.text
        assert service.process.poll() is None
        code = service.process.wait(15)
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
    log = service.log()
    assert code in STOPPED, log
    assert "serving 2 s more while load balancers take this replica out" in log
    assert log.index("serving 2 s more") < log.index("Shutdown step 'store': closed")


def test_make_run_stops_on_ctrl_c_with_a_clean_shutdown_and_no_error_from_make(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """The README's first command, at a terminal: Ctrl-C stops the service cleanly, and make says nothing."""
    port = free_port()
    pid, terminal = pty.fork()
    if pid == 0:  # the child: make, on the terminal
        os.chdir(ROOT)
        os.execvpe("make", ["make", "--no-print-directory", "run"], {**service_env, "PORT": str(port)})
    output = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(terminal, 4096):
                output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: _ready(port), timeout=60), output.decode(errors="replace")
        os.write(terminal, b"\x03")  # Ctrl-C, as the terminal sends it: to its foreground job
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    reader.join(5)
    os.close(terminal)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert CLOSED in text and "Interrupt" not in text and "Error" not in text, text
