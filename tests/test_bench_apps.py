"""The benchmark's real-application scenarios, the pure parts: parsing the tools' output
(captured from wrk 4.1, redis-benchmark 7.0 and pgbench 15 on Debian 12), the figures,
the table rows, the latency distributions, the configurations and the flags. No root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import apps, apptools, chart, cli, proxies, report
from lab import apps as lab_apps

# wrk -t1 -c4 -d1s --latency -s <apptools.WRK_SCRIPT> (the cdf lines cut down)
WRK_KEEPALIVE = """\
Running 1s test @ http://127.0.0.1:18080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   239.06us  679.38us  13.29ms   94.82%
    Req/Sec    35.68k     3.64k   40.98k    54.55%
  Latency Distribution
     50%   93.00us
     75%  106.00us
     90%  208.00us
     99%    3.36ms
  38994 requests in 1.10s, 46.97MB read
Requests/sec:  35454.05
Transfer/sec:     42.70MB
cdf 50 93
cdf 97 109
cdf 99 957
cdf 99.5 1819
cdf 99.9 3598
cdf 99.95 3889
cdf 99.99 4109
cdf 100 4147
"""

# wrk -H 'Connection: close' through a proxy that cut connections (no cdf lines)
WRK_CLOSE_ERRORS = """\
Running 2s test @ http://10.249.0.2:5004/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    17.74ms    4.10ms  35.94ms   71.00%
    Req/Sec   443.00     50.00   500.00     70.00%
  Latency Distribution
     50%   17.74ms
     75%   20.00ms
     90%   25.00ms
     99%   30.56ms
  886 requests in 2.00s, 1.06MB read
  Socket errors: connect 2, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    443.00
Transfer/sec:    544.00KB
"""

# redis-benchmark -c 8 -n 3000 -P 1 -t set,get (no -q, no --csv); progress ends in \r
REDIS = (
    " \rSET: rps=0.0 (overall: inf) avg_msec=0.388 (overall: 0.388)\r"
    "                                                            \r====== SET ======\n"
    """\
  3000 requests completed in 0.04 seconds
  8 parallel clients
  3 bytes payload
  keep alive: 1
  host configuration "save":
  host configuration "appendonly": no
  multi-thread: no

Latency by percentile distribution:
0.000% <= 0.023 milliseconds (cumulative count 1)
50.000% <= 0.063 milliseconds (cumulative count 1852)
75.000% <= 0.079 milliseconds (cumulative count 2254)
99.219% <= 0.183 milliseconds (cumulative count 2979)
99.902% <= 0.415 milliseconds (cumulative count 2998)
100.000% <= 0.439 milliseconds (cumulative count 3000)

Cumulative distribution of latencies:
85.867% <= 0.103 milliseconds (cumulative count 2576)
100.000% <= 0.503 milliseconds (cumulative count 3000)

Summary:
  throughput summary: 73170.73 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.069     0.016     0.063     0.127     0.167     0.439
"""
    " \r====== GET ======\n"
    """\
  3000 requests completed in 0.06 seconds
  8 parallel clients

Latency by percentile distribution:
0.000% <= 0.023 milliseconds (cumulative count 3)
50.000% <= 0.071 milliseconds (cumulative count 1635)
99.609% <= 2.951 milliseconds (cumulative count 2989)
99.902% <= 3.575 milliseconds (cumulative count 2998)
100.000% <= 3.591 milliseconds (cumulative count 3000)

Cumulative distribution of latencies:
75.400% <= 0.103 milliseconds (cumulative count 2262)
99.867% <= 3.103 milliseconds (cumulative count 2996)

Summary:
  throughput summary: 50000.00 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.120     0.023     0.071     0.151     1.631     3.591
"""
)

# pgbench -S -n -c 4 -j 1 -T 2 -l
PGBENCH = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 4
number of threads: 1
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 81641
number of failed transactions: 0 (0.000%)
latency average = 0.097 ms
initial connection time = 22.534 ms
tps = 41202.862565 (without initial connection time)
"""


def test_wrk_keepalive_figures_in_microseconds() -> None:
    r = apptools.parse_wrk(WRK_KEEPALIVE)
    assert (r.requests, r.seconds, r.per_s) == (38994, pytest.approx(1.10), 35454.05)
    assert r.p50_us == pytest.approx(93.0)
    assert r.p99_us == pytest.approx(3360.0)  # "3.36ms"
    assert r.p999_us == 3598  # from the Lua hook's distribution
    assert r.errors == 0
    assert r.cdf[0] == [50.0, 93.0] and r.cdf[-1] == [100.0, 4147.0]


def test_wrk_errors_are_socket_errors_plus_bad_statuses() -> None:
    r = apptools.parse_wrk(WRK_CLOSE_ERRORS)
    assert r.errors == 2 + 3 + 0 + 1 + 4
    assert (r.p50_us, r.p99_us) == (pytest.approx(17740.0), pytest.approx(30560.0))
    assert r.p999_us is None and r.cdf == []  # no Lua lines: no p99.9, no distribution


def test_wrk_script_prints_every_percentile_and_the_maximum() -> None:
    for p in apptools.CDF_PERCENTILES:
        assert f"{p:g}," in apptools.WRK_SCRIPT or f"{p:g}}}" in apptools.WRK_SCRIPT
    assert "latency.max" in apptools.WRK_SCRIPT  # percentile(100) reads 0 in wrk


@pytest.mark.parametrize(
    "text", ["", "wrk: connection refused\n", WRK_KEEPALIVE.split("Requests/sec")[0]]
)
def test_wrk_without_figures_is_an_error(text: str) -> None:
    with pytest.raises(apptools.ParseError):
        apptools.parse_wrk(text)


def test_redis_benchmark_by_test_with_the_percentile_block_only() -> None:
    tests = apptools.parse_redis_benchmark(REDIS)
    assert list(tests) == ["SET", "GET"]
    s, g = tests["SET"], tests["GET"]
    assert (s.requests, s.per_s, s.p50_us, s.p99_us) == (3000, 73170.73, 63.0, 167.0)
    assert (g.per_s, g.p50_us, g.p99_us) == (50000.0, 71.0, 1631.0)
    # the "Cumulative distribution" block (by latency bucket) is not mixed in
    assert [p for p, _ in s.cdf] == [0.0, 50.0, 75.0, 99.219, 99.902, 100.0]
    assert s.p999_us == pytest.approx(415.0) and g.p999_us == pytest.approx(3575.0)


def test_redis_combined_rate_from_each_tests_rate_latency_of_get() -> None:
    combined = apptools.combine_redis(apptools.parse_redis_benchmark(REDIS), latency_of="GET")
    assert combined.requests == 6000
    assert combined.per_s == pytest.approx(6000 / (3000 / 73170.73 + 3000 / 50000.0))
    assert (combined.p50_us, combined.p99_us) == (71.0, 1631.0)
    with pytest.raises(apptools.ParseError):
        apptools.combine_redis(apptools.parse_redis_benchmark(REDIS), latency_of="INCR")


def test_redis_benchmark_without_sections_is_an_error() -> None:
    with pytest.raises(apptools.ParseError):
        apptools.parse_redis_benchmark("Could not connect to Redis at 10.0.0.2:5005\n")
    with pytest.raises(apptools.ParseError):  # a section cut before its summary
        apptools.parse_redis_benchmark(REDIS.split("Summary:")[0])


def test_pgbench_percentiles_from_its_transaction_log() -> None:
    # client_id transaction_no latency_us script_no epoch_s epoch_us: 1..1000 us
    log = [f"{i % 4} {i} {i + 1} 0 1796189309 {i}" for i in range(1000)]
    r = apptools.parse_pgbench(PGBENCH, log)
    assert (r.requests, r.per_s, r.seconds, r.errors) == (81641, 41202.862565, 2.0, 0)
    assert (r.p50_us, r.p99_us, r.p999_us) == (500.0, 990.0, 999.0)
    assert r.cdf[-1] == [100.0, 1000.0]


def test_pgbench_without_a_log_has_the_average_only() -> None:
    r = apptools.parse_pgbench(PGBENCH)
    assert r.p50_us == pytest.approx(97.0) and r.p999_us is None and r.cdf == []
    with pytest.raises(apptools.ParseError):
        apptools.parse_pgbench("pgbench: error: connection to server failed\n")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [apptools.percentile(values, p) for p in (1, 50, 99, 99.9, 100)] == [
        1.0,
        50.0,
        99.0,
        100.0,
        100.0,
    ]
    thousand = [float(v) for v in range(1, 1001)]
    assert apptools.percentile(thousand, 99.9) == 999.0  # not 1000: no floating-point excess
    assert apptools.at_percentile([[50.0, 1.0], [99.0, 2.0]], 99.9) is None


def test_figures_cpu_per_request_only_for_a_tls_set_up() -> None:
    r = apptools.parse_wrk(WRK_KEEPALIVE)
    tls = apptools.figures("http_ka", r, proxy_cpu_s=3.8994)
    assert tls["http_ka_cpu_us_per_req"] == pytest.approx(100.0)
    assert tls["http_ka_per_s"] == 35454.05 and tls["http_ka_p999_us"] == 3598
    assert tls["http_ka_cdf_us"] == r.cdf
    plain = apptools.figures("http_ka", r, proxy_cpu_s=None)
    assert not any(k.startswith("http_ka_cpu") for k in plain)
    pg = apptools.figures("pg", apptools.parse_pgbench(PGBENCH), 8.1641, unit="tx")
    assert pg["pg_cpu_us_per_tx"] == pytest.approx(100.0)


def _rep(per_s: float, p99: float, cpu: float | None = None) -> dict[str, Any]:
    rep: dict[str, Any] = {"http_close_per_s": per_s, "http_close_p99_us": p99}
    rep["http_close_cdf_us"] = [[50.0, p99 / 2], [99.0, p99]]
    if cpu is not None:
        rep["http_close_cpu_us_per_req"] = cpu
    return rep


def test_table_shows_app_rows_as_ratios_to_haproxy() -> None:
    reps = {
        "plaintext": [_rep(12000, 1000)],
        "trio-tproxy": [_rep(400, 30000, 2500), _rep(500, 20000, 2400), _rep(450, 25000, 2450)],
        "haproxy": [_rep(900, 9000, 1000)],
    }
    med = {name: report.medians(r) for name, r in reps.items()}
    assert "http_close_cdf_us" not in med["haproxy"]  # distributions are not medians
    text = report.table(list(reps), med, {n: report.counts(r) for n, r in reps.items()}, 3)
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    rate = rows["nginx+wrk Connection: close, rate"]
    assert "req/s" in rate and "higher" in rate and "450 [1]" not in rate
    assert "450 (0.50x)" in rate and "900 [1] (1.00x)" in rate
    assert "2,450 (2.45x)" in rows["nginx+wrk Connection: close, proxy CPU A+B"]


def test_cdfs_take_the_repetition_with_the_median_p99() -> None:
    reps = {"trio-tproxy": [_rep(400, 30000), _rep(500, 20000), _rep(450, 25000)]}
    reps["haproxy"] = [{"http_close_per_s": 900.0}]  # no distribution: left out
    picked = report.cdfs(reps)
    assert picked == {"http_close": {"trio-tproxy": [[50.0, 12500.0], [99.0, 25000.0]]}}


def test_nines_axis() -> None:
    assert [round(chart.nines(p), 6) for p in (0, 90, 99, 99.9)] == [0.0, 1.0, 2.0, 3.0]
    assert chart.nines(100) == 5.0


def test_chart_draws_the_tail_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    med = {"trio-tproxy": {"http_close_per_s": 450.0}, "haproxy": {"http_close_per_s": 900.0}}
    cdfs = report.cdfs({"trio-tproxy": [_rep(450, 25000)], "haproxy": [_rep(900, 9000)]})
    message = chart.draw(tmp_path / "c.png", ["trio-tproxy", "haproxy"], med, "t", cdfs)
    assert message.endswith("c.png") and (tmp_path / "c.png").stat().st_size > 10_000


def test_cdf_grid_is_the_same_in_the_lab_client() -> None:
    # lab/apps.py runs by path with the stdlib only: it keeps its own copy of the grid
    assert lab_apps.CDF_PERCENTILES == apptools.CDF_PERCENTILES
    assert {50, 99, 99.9} <= set(apptools.CDF_PERCENTILES)


def test_servers_bind_the_wildcard_and_stay_in_the_foreground(tmp_path: Path) -> None:
    conf = apps.nginx_conf(tmp_path, 5004)
    assert "listen 0.0.0.0:5004;" in conf and "daemon off;" in conf
    assert "worker_processes 1;" in conf and f"root {tmp_path}/www;" in conf
    redis = apps.redis_argv(5005, tmp_path)
    assert redis[redis.index("--bind") + 1] == "0.0.0.0"
    assert redis[redis.index("--daemonize") + 1] == "no"
    pg = apps.postgres_argv(5006, tmp_path / "data", tmp_path)
    assert "listen_addresses=0.0.0.0" in pg and pg[0] == "setpriv"


def test_load_generators_argv(tmp_path: Path) -> None:
    close = apps.wrk_argv("http://b:5004/", 2.0, tmp_path / "s.lua", close=True)
    assert close[close.index("-H") + 1] == "Connection: close" and "--latency" in close
    assert "-H" not in apps.wrk_argv("http://b:5004/", 2.0, tmp_path / "s.lua", close=False)
    rb = apps.redis_benchmark_argv("10.0.0.2", 5005, 1000, 16)
    assert rb[rb.index("-P") + 1] == "16" and rb[rb.index("-t") + 1] == "set,get"
    assert "--csv" not in rb and "-q" not in rb  # the percentile block is needed
    pg = apps.pgbench_argv("10.0.0.2", 5006, 2.0, tmp_path / "tx")
    assert "-S" in pg and "-l" in pg and pg[pg.index("-T") + 1] == "2"


def test_missing_tools_name_their_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps.shutil, "which", lambda _: None)
    monkeypatch.setattr(apps, "postgres_bin", lambda _: None)
    problems = " / ".join(apps.missing(["nginx", "redis", "pgbench"]))
    for package in ("nginx-light", "wrk", "redis-server", "redis-tools", "postgresql"):
        assert f"apt-get install {package}" in problems
    assert apps.missing([]) == []


def test_app_ports_are_forwarded_by_stunnel_and_haproxy() -> None:
    pair = proxies.Haproxy(lab=None)  # type: ignore[arg-type]
    by_name = {s.name: s for s in pair.services()}
    assert by_name["http"].app == 5004 and by_name["pg"].app == 5006
    assert by_name["redis"].local == 16005 and by_name["redis"].remote == 26005
    assert proxies.app_port("idle") == 5003  # the synthetic services keep their ports


def test_flags_choose_the_apps() -> None:
    assert cli.parse_args(["--quick"]).apps == list(apps.APPS)
    assert cli.parse_args(["--no-apps"]).apps == []
    assert cli.parse_args(["--apps", "redis,nginx"]).apps == ["nginx", "redis"]
    quick = cli.parse_args(["--quick"]).settings
    assert (quick.app_seconds, quick.redis_requests) == (2.0, 10_000)
    assert cli.parse_args(["--quick", "--app-seconds", "7"]).settings.app_seconds == 7.0
    with pytest.raises(SystemExit):
        cli.parse_args(["--apps", "mysql"])
