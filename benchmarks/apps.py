"""Real applications through the four set-ups: nginx + wrk, redis + redis-benchmark, pgbench.

Why: the synthetic tests (lab/apps.py) isolate one cost each; users feel the
mix, with real clients' wake-up patterns and pipelining. Each app runs as
the server in pod B, started once per benchmark run (like lab/apps.py's
``serve``) and bound to the wildcard address, so that it answers both the
proxies' ``127.0.0.1`` (stunnel, haproxy) and the sidecar's dial to B's pod
IP (trio-tproxy ingress delivers to the original destination). The load
generator runs in pod A and dials what :meth:`Proxy.target` says, exactly
like the synthetic clients.

Lifecycle: every server is a non-daemon child of ours, started with
``Topology.popen`` (so ``PodLab``'s teardown ends it on any error, Ctrl-C
or SIGTERM too), in a temporary directory of its own (config, data, logs),
stopped and reaped by :meth:`AppServers.close`. postgres runs as the
``postgres`` user (it refuses root) through ``setpriv``, which execs in
place: the PID we hold is the postmaster's, whose backends /proc counts as
its tree.

Scenarios and figures (keys in the JSON, rows in the table):

* ``http_ka`` / ``http_close``: ``wrk -t1 -c8`` for ``app_seconds`` on a 1 KiB
  static file, keep-alive or ``Connection: close`` (a new TCP and TLS
  connection per request);
* ``redis_p1`` / ``redis_p16``: ``redis-benchmark -c 8 -t set,get`` with
  ``-P 1`` / ``-P 16``; the rate and CPU over both tests, the latency of GET;
* ``pg``: ``pgbench -S -c 4 -j 1 -T app_seconds`` (select-only), latency
  percentiles from its per-transaction log.

Each gives ``<key>_per_s``, ``_p50_us``, ``_p99_us``, ``_p999_us`` (where the
tool gives it), ``_errors``, ``_cdf_us`` (the distribution, for the chart) and,
for a TLS set-up, the proxies' CPU (A+B) per request or transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.pods import PodLab

from . import apptools, scenarios
from .proxies import app_port

APPS = ("nginx", "redis", "pgbench")
#: The static body wrk fetches.
HTTP_BODY_BYTES = 1024
WRK_CONNECTIONS = 8
REDIS_CLIENTS = 8
PG_CLIENTS = 4
#: -P 16 sends 16 times as many requests per round trip: 4x the count keeps it a few seconds.
REDIS_P16_FACTOR = 4
PG_USER = "postgres"
Result = dict[str, Any]


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (not on PATH in Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def tools_needed(apps: list[str]) -> list[tuple[str, str | None, str]]:
    """(tool, its path or None, the Debian package that has it) for the chosen apps."""
    needed: list[tuple[str, str | None, str]] = []
    if "nginx" in apps:
        needed += [
            ("nginx", shutil.which("nginx"), "nginx-light"),
            ("wrk", shutil.which("wrk"), "wrk"),
        ]
    if "redis" in apps:
        needed += [
            ("redis-server", shutil.which("redis-server"), "redis-server"),
            ("redis-benchmark", shutil.which("redis-benchmark"), "redis-tools"),
        ]
    if "pgbench" in apps:
        needed += [
            ("postgres", postgres_bin("postgres"), "postgresql"),
            ("initdb", postgres_bin("initdb"), "postgresql"),
            ("pgbench", shutil.which("pgbench") or postgres_bin("pgbench"), "postgresql-client"),
            ("setpriv", shutil.which("setpriv"), "util-linux"),
        ]
    return needed


def missing(apps: list[str]) -> list[str]:
    """What keeps the chosen apps from running, one sentence each (empty: all there)."""
    problems = [
        f"{tool} is not installed (apt-get install {package})"
        for tool, path, package in tools_needed(apps)
        if path is None
    ]
    if "pgbench" in apps:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            problems.append(f"no '{PG_USER}' user to run postgres (apt-get install postgresql)")
    return problems


# -- configurations (pure) -------------------------------------------------------


def nginx_conf(prefix: Path, port: int) -> str:
    """One worker (like one trio process), no access log, everything inside ``prefix``."""
    return "\n".join(
        [
            "user root;",  # the files live in our private temp dir; no privilege drop
            "worker_processes 1;",
            "daemon off;",
            f"pid {prefix}/nginx.pid;",
            f"error_log {prefix}/error.log warn;",
            "events { worker_connections 4096; }",
            "http {",
            "    access_log off;",
            *(f"    {kind}_temp_path {prefix}/{kind};" for kind in _NGINX_TEMPS),
            "    keepalive_requests 1000000;",  # keep-alive means one connection per wrk socket
            "    tcp_nodelay on;",
            f"    server {{ listen 0.0.0.0:{port}; root {prefix}/www; }}",
            "}",
            "",
        ]
    )


_NGINX_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def redis_argv(port: int, workdir: Path) -> list[str]:
    return [
        shutil.which("redis-server") or "redis-server",
        "--port", str(port), "--bind", "0.0.0.0", "--protected-mode", "no",
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", str(workdir), "--logfile", "",
    ]  # fmt: skip


def postgres_argv(port: int, datadir: Path, sockdir: Path) -> list[str]:
    # Select-only load: durability settings do not matter; off to make pgbench -i quick.
    return [
        *_as_postgres(),
        postgres_bin("postgres") or "postgres",
        "-D", str(datadir), "-p", str(port), "-k", str(sockdir),
        "-c", "listen_addresses=0.0.0.0", "-c", "fsync=off",
        "-c", "synchronous_commit=off", "-c", "max_connections=50",
    ]  # fmt: skip


def _as_postgres() -> list[str]:
    # setpriv execs in place (no fork, unlike su/runuser): the PID is the program's.
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups"]


def wrk_argv(url: str, seconds: float, script: Path, close: bool) -> list[str]:
    argv = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency"]
    argv += ["-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def redis_benchmark_argv(host: str, port: int, requests: int, pipeline: int) -> list[str]:
    return [
        "redis-benchmark", "-h", host, "-p", str(port), "-c", str(REDIS_CLIENTS),
        "-n", str(requests), "-P", str(pipeline), "-t", "set,get",
    ]  # fmt: skip


def pgbench_argv(host: str, port: int, seconds: float, log_prefix: Path) -> list[str]:
    return [
        shutil.which("pgbench") or postgres_bin("pgbench") or "pgbench",
        "-h", host, "-p", str(port), "-U", PG_USER, "-S", "-n",
        "-c", str(PG_CLIENTS), "-j", "1", "-T", str(max(1, round(seconds))),
        "-l", "--log-prefix", str(log_prefix), "postgres",
    ]  # fmt: skip


# -- the servers in pod B -------------------------------------------------------------


@dataclass
class AppServers:
    """The chosen apps' servers in pod B, by app name; :meth:`close` stops them all."""

    lab: PodLab
    root: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, apps: list[str]) -> None:
        for app in apps:
            {"nginx": self._nginx, "redis": self._redis, "pgbench": self._postgres}[app]()

    def pid(self, app: str) -> int:
        return self.processes[app].pid

    def close(self) -> None:
        for app, proc in list(self.processes.items()):
            # postgres: SIGINT is its fast shutdown (SIGTERM would wait for clients).
            sig = signal.SIGINT if app == "pgbench" else signal.SIGTERM
            self.lab.topology.stop(proc, sig=sig, timeout=10)
            del self.processes[app]

    def _dir(self, app: str) -> Path:
        path = self.root / app
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _popen(self, app: str, argv: list[str], port: int) -> None:
        log = open(self._dir(app) / "server.log", "ab")  # noqa: SIM115 - the child owns it
        with log:
            proc = self.lab.topology.popen("b", argv, stdout=log, stderr=subprocess.STDOUT)
        self.processes[app] = proc
        try:
            self.lab.topology.wait_port("b", "0.0.0.0", port, timeout=30, proc=proc)
        except Exception as exc:
            text = (self._dir(app) / "server.log").read_text(errors="replace")[-1500:]
            raise scenarios.LoadgenError(f"{app} did not start: {exc}\n{text}") from exc

    def _nginx(self) -> None:
        prefix = self._dir("nginx")
        (prefix / "www").mkdir(exist_ok=True)
        (prefix / "www" / "index.html").write_bytes(b"x" * (HTTP_BODY_BYTES - 1) + b"\n")
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, app_port("http")))
        nginx = shutil.which("nginx") or "nginx"
        self._popen("nginx", [nginx, "-c", str(conf), "-p", str(prefix)], app_port("http"))

    def _redis(self) -> None:
        port = app_port("redis")
        self._popen("redis", redis_argv(port, self._dir("redis")), port)

    def _postgres(self) -> None:
        pg = self._dir("pgbench")
        data = pg / "data"
        user = pwd.getpwnam(PG_USER)
        # postgres refuses root: its directory belongs to the postgres user, who must be
        # able to reach it (servers() makes the root directory 0711 for that).
        os.chown(pg, user.pw_uid, user.pw_gid)
        initdb = [postgres_bin("initdb") or "initdb", "-D", str(data), "-A", "trust"]
        initdb += ["-U", PG_USER, "--no-sync", "-E", "UTF8"]
        done = subprocess.run(
            [*_as_postgres(), *initdb], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise scenarios.LoadgenError(f"initdb failed: {done.stdout}{done.stderr}"[-2000:])
        # initdb -A trust lets in local and loopback clients only; the sidecar in B dials
        # from B's pod IP (or A's, preserving the client's address).
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
        port = app_port("pg")
        self._popen("pgbench", postgres_argv(port, data, pg), port)
        init = [shutil.which("pgbench") or "pgbench", "-i", "-q", "-s", "1"]
        init += ["-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "postgres"]
        done = self.lab.topology.run("b", init, timeout=120)
        if done.returncode != 0:
            raise scenarios.LoadgenError(f"pgbench -i failed: {done.stderr[-2000:]}")


@contextlib.contextmanager
def servers(lab: PodLab, apps: list[str]) -> Iterator[AppServers]:
    """The apps' servers in pod B for the ``with`` block, in a temporary directory.

    Not inside the lab's work directory: that one is root's alone (0700, it holds the
    keys), and postgres runs as another user."""
    root = Path(tempfile.mkdtemp(prefix="trio-tproxy-bench-apps-"))
    root.chmod(0o711)  # others may traverse, not list
    running = AppServers(lab, root)
    try:
        running.start(apps)
        yield running
    finally:
        running.close()
        shutil.rmtree(root, ignore_errors=True)


# -- the scenarios --------------------------------------------------------------------


def _ctx(ctx: scenarios.Context, server_pid: int) -> scenarios.Context:
    return dataclasses.replace(ctx, server_pid=server_pid)


def _loadgen(run: scenarios.ClientRun, seconds: float) -> Result:
    """The same figures as the synthetic tests': client, server and foreign CPU, % of a core."""
    return {
        "client_cpu_pct": 100 * run.client_cpu / seconds,
        "server_cpu_pct": 100 * run.server_cpu / seconds,
        "other_cpu_pct": 100 * run.other_cpu / run.wall,
    }


def _proxy_cpu(ctx: scenarios.Context, run: scenarios.ClientRun) -> float | None:
    return sum(run.proxy_cpu_by_pod.values()) if ctx.proxy.tls else None


def http(ctx: scenarios.Context, servers: AppServers, close: bool) -> Result:
    key = "http_close" if close else "http_ka"
    host, port = ctx.proxy.target("http")
    script = servers.root / "wrk-cdf.lua"
    script.write_text(apptools.WRK_SCRIPT)
    seconds = ctx.settings.app_seconds
    argv = wrk_argv(f"http://{host}:{port}/", seconds, script, close)
    run = scenarios.run_client(_ctx(ctx, servers.pid("nginx")), argv, timeout=seconds + 60)
    try:
        result = apptools.parse_wrk(run.stdout)
    except apptools.ParseError as exc:
        raise scenarios.LoadgenError(f"{ctx.proxy.name}: {exc}") from None
    if result.requests == 0:
        raise scenarios.LoadgenError(f"{ctx.proxy.name}: wrk made no request: {run.stdout}")
    out: Result = dict(apptools.figures(key, result, _proxy_cpu(ctx, run)))
    out["loadgen"] = _loadgen(run, result.seconds)
    return out


def redis(ctx: scenarios.Context, servers: AppServers, pipeline: int) -> Result:
    key = f"redis_p{pipeline}"
    host, port = ctx.proxy.target("redis")
    requests = ctx.settings.redis_requests * (REDIS_P16_FACTOR if pipeline > 1 else 1)
    argv = redis_benchmark_argv(host, port, requests, pipeline)
    run = scenarios.run_client(_ctx(ctx, servers.pid("redis")), argv, timeout=600)
    try:
        tests = apptools.parse_redis_benchmark(run.stdout)
        combined = apptools.combine_redis(tests, latency_of="GET")
    except apptools.ParseError as exc:
        raise scenarios.LoadgenError(f"{ctx.proxy.name}: {exc}") from None
    out: Result = dict(apptools.figures(key, combined, _proxy_cpu(ctx, run)))
    out[f"{key}_tests"] = {name: apptools.summary(r) for name, r in tests.items()}
    out["loadgen"] = _loadgen(run, combined.seconds)
    return out


def pgbench(ctx: scenarios.Context, servers: AppServers) -> Result:
    host, port = ctx.proxy.target("pg")
    logs = Path(tempfile.mkdtemp(prefix="pgbench-log-", dir=servers.root))
    try:
        argv = pgbench_argv(host, port, ctx.settings.app_seconds, logs / "tx")
        run = scenarios.run_client(
            _ctx(ctx, servers.pid("pgbench")), argv, timeout=ctx.settings.app_seconds + 60
        )
        lines: list[str] = []
        for log in sorted(logs.iterdir()):
            lines += log.read_text().splitlines()
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    try:
        result = apptools.parse_pgbench(run.stdout, lines)
    except apptools.ParseError as exc:
        raise scenarios.LoadgenError(f"{ctx.proxy.name}: {exc}") from None
    out: Result = dict(apptools.figures("pg", result, _proxy_cpu(ctx, run), unit="tx"))
    out["loadgen"] = _loadgen(run, result.seconds)
    return out


def tests(
    ctx: scenarios.Context, servers: AppServers, apps: list[str]
) -> list[tuple[str, Callable[[], Result]]]:
    """(test name, how to run it) for the chosen apps, in a fixed order."""
    found: list[tuple[str, Callable[[], Result]]] = []
    if "nginx" in apps:
        found += [
            ("http_ka", lambda: http(ctx, servers, close=False)),
            ("http_close", lambda: http(ctx, servers, close=True)),
        ]
    if "redis" in apps:
        found += [
            ("redis_p1", lambda: redis(ctx, servers, 1)),
            ("redis_p16", lambda: redis(ctx, servers, 16)),
        ]
    if "pgbench" in apps:
        found.append(("pg", lambda: pgbench(ctx, servers)))
    return found
