"""A real squid for tests and notebooks: an HTTP proxy on a free loopback port, its own folder and access log,
Basic authentication when asked, CONNECT allowed only to the ports it is given (as a corporate proxy would
allow 443), stopped by PID. Debian's `squid-openssl` package (`make test` installs it)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .redis_server import _free_port

HELPER = Path("/usr/lib/squid/basic_ncsa_auth")
CERTGEN = Path("/usr/lib/squid/security_file_certgen")


class Squid:
    """`with Squid(ports=[…], users={"jo": "pw"}) as squid: squid.url` — CONNECT to 127.0.0.1 at `ports` only;
    with `users`, every request needs one of their Basic credentials (407 otherwise). With `bump` (the proxy's
    CA certificate and key, PEM) it inspects TLS as corporate proxies do: it answers each CONNECT's TLS itself
    with a certificate it makes for the server, signed by that CA, and opens its own TLS to the server, which
    it verifies against `upstream_ca`."""

    def __init__(self, ports: list[int], users: dict[str, str] | None = None, port: int = 0,
                 bump: tuple[Path, Path] | None = None, upstream_ca: Path | None = None,
                 host: str = "127.0.0.1", idle_timeout_s: float | None = None) -> None:
        self.host = host
        self.idle_timeout_s = idle_timeout_s  # cut a tunnel silent this long (read_timeout); None: squid's 15 min  # the address it listens on (a corporate namespace's way out, poc.workbook.experiments)
        self.ports = ports
        self.users = users or {}
        self.bump = bump
        self.upstream_ca = upstream_ca
        self.port = port or _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="poc-squid-"))  # outside private test folders: squid's user reads it
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def access_log(self) -> str:
        path = self.folder / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _configure(self) -> Path:
        auth = []
        if self.users:
            lines = [f"{user}:{_hash(password)}" for user, password in self.users.items()]
            (self.folder / "passwd").write_text("\n".join(lines) + "\n")
            auth = [f"auth_param basic program {HELPER} {self.folder / 'passwd'}", "auth_param basic realm poc",
                    "acl authenticated proxy_auth REQUIRED"]
        listen = [f"http_port {self.host}:{self.port}"]
        if self.bump:
            cert, key = (shutil.copy(path, self.folder / f"bump-{i}.pem") for i, path in enumerate(self.bump))
            subprocess.run([str(CERTGEN), "-c", "-s", str(self.folder / "certs"), "-M", "4MB"], check=True,
                           capture_output=True)
            listen = [f"http_port {self.host}:{self.port} ssl-bump generate-host-certificates=on "
                      f"dynamic_cert_mem_cache_size=4MB tls-cert={cert} tls-key={key}",
                      f"sslcrtd_program {CERTGEN} -s {self.folder / 'certs'} -M 4MB", "sslcrtd_children 2",
                      "acl step1 at_step SslBump1", "acl step2 at_step SslBump2", "ssl_bump peek step1",
                      "ssl_bump stare step2", "ssl_bump bump all",  # the server's certificate first: its names copied
                      f"tls_outgoing_options cafile={shutil.copy(self.upstream_ca, self.folder / 'upstream-ca.pem')}",
                      "http_upgrade_request_protocols websocket allow all",
                      "http_upgrade_request_protocols WebSocket allow all"]
        config = [
            *listen,
            f"pid_filename {self.folder / 'squid.pid'}",
            f"cache_log {self.folder / 'cache.log'}",
            f"access_log stdio:{self.folder / 'access.log'}",
            "logfile_rotate 0", "cache deny all", "cache_mem 8 MB", f"coredump_dir {self.folder}",
            "pinger_enable off", "shutdown_lifetime 1 seconds",
            f"read_timeout {self.idle_timeout_s:g} seconds" if self.idle_timeout_s else "",
            "acl gateway_ports port " + " ".join(str(p) for p in self.ports),
            "acl CONNECT method CONNECT",
            "http_access deny !gateway_ports",  # CONNECTs, and requests inside bumped TLS, to the gateway only
            *auth,
            "http_access allow authenticated" if self.users else "http_access allow localhost",
            "http_access deny all",
        ]
        path = self.folder / "squid.conf"
        path.write_text("\n".join(line for line in config if line) + "\n")
        if os.geteuid() == 0:  # squid drops root for its own user, which must read and write here
            proxy_user = pwd.getpwnam("proxy")
            for item in (self.folder, *self.folder.rglob("*")):
                os.chown(item, proxy_user.pw_uid, proxy_user.pw_gid)
        return path

    def start(self, timeout: float = 15.0) -> "Squid":
        binary = shutil.which("squid") or shutil.which("squid", path="/usr/sbin")
        if binary is None or not HELPER.exists():
            raise RuntimeError("squid is not installed: `make test` installs it (apt-get install squid-openssl)")
        config = self._configure()
        log = open(self.folder / "stderr.log", "ab")
        self.process = subprocess.Popen([binary, "-N", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"squid exited with {self.process.returncode}: "
                                   f"{(self.folder / 'stderr.log').read_text()[-800:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
                    if s.recv(16).startswith(b"HTTP/1."):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"squid did not answer on port {self.port} within {timeout:g} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> "Squid":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _hash(password: str) -> str:
    """An Apache MD5 (apr1) hash, which squid's basic_ncsa_auth reads, from `openssl passwd`."""
    return subprocess.run(["openssl", "passwd", "-apr1", password], check=True, capture_output=True,
                          text=True).stdout.strip()
