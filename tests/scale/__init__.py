"""nginx (the Debian package) in front of gateway replicas, run from deploy/nginx.conf in a directory of
its own, on a free loopback port, as a foreground process stopped by its PID."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.harness import free_port, wait_until

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
_ACCESS_LINE = re.compile(r"^(\d{3}) \S+ \"[^\"]*\" id=(\S+) upstream=(.*)$")


def nginx_binary() -> str:
    """`.ci/run` installs the package; a machine without it fails here saying so."""
    found = shutil.which("nginx") or next(
        (str(p) for p in (Path("/usr/sbin/nginx"), Path("/sbin/nginx")) if p.exists()), None
    )
    if found is None:
        raise RuntimeError("nginx not found: `apt-get install -y nginx` (.ci/run does it)")
    return found


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Nginx:
    def __init__(self, run_dir: Path, replica_ports: Sequence[int]) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        servers = "\n".join(f"        server 127.0.0.1:{port};" for port in replica_ports)
        conf = (
            CONF.read_text()
            .replace("@RUN@", str(run_dir))
            .replace("@LISTEN@", f"127.0.0.1:{self.port}")
            .replace("@SERVERS@", servers)
        )
        if os.geteuid() == 0:
            # As root, nginx's workers would run as `nobody`, who cannot enter the test's private tmp dir.
            conf = "user root;\n" + conf
        self.conf_path = run_dir / "nginx.conf"
        self.conf_path.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Nginx:
        binary = nginx_binary()
        error_log = str(self.run_dir / "nginx-error.log")
        check = [binary, "-p", str(self.run_dir), "-e", error_log, "-c", str(self.conf_path)]
        subprocess.run([*check, "-t", "-q"], check=True, capture_output=True, timeout=30)
        self.proc = subprocess.Popen(check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.proc is not None and (self.proc.poll() is not None or accepts(self.port)))
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.run_dir / 'nginx-error.log').read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def replicas_by_request(self) -> dict[str, list[str]]:
        """Each X-Request-Id nginx passed on, with the replicas it tried, the one that answered last."""
        tried: dict[str, list[str]] = {}
        log = self.run_dir / "nginx-access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            match = _ACCESS_LINE.match(line)
            if match and match.group(2) != "-":
                tried[match.group(2)] = re.split(r", | : ", match.group(3))
        return tried
