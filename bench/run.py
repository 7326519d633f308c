"""The benchmark: `make bench` (quick, a few minutes) or `make bench FULL=1` (adds 1M rows).

Runs against the PostgreSQL in DATABASE_URL (`make bench` starts a throwaway one), seeds
it as `python -m service seed` does, serves every variant with uvicorn (one worker, no access
log), drives load with wrk over 127.0.0.1 and writes bench/RESULTS.md and bench/results.png.
Every number is the median of interleaved rounds (A B C A B C ...) taken in this one run,
so ratios hold on a noisy machine. Server CPU per request comes from /proc/<pid>/stat.

bench/harness.py starts and measures the servers, bench/database.py seeds and inspects the
table, bench/scenarios.py measures, bench/results.py writes the report. Run it as
`python -m bench.run [--full]` from the repository root.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from bench import scenarios, telemetry_layers
from bench.database import SeedRate, migrate, seed_table, service_env, service_settings
from bench.harness import Series, log, start_uvicorn
from bench.results import Report, machine, versions
from bench.scenarios import DEPTH_ROWS, FULL, PAGE, QUICK, SCROLL, THROUGHPUT_ROWS, Budget
from service.db import create_engine

BENCH = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="also measure 1M rows")
    parser.add_argument(
        "--only-telemetry", action="store_true",
        help="only the cost of request ids, access line and metrics; prints, writes nothing",
    )
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if make_url(url).get_backend_name() != "postgresql":
        sys.exit("bench/run.py needs DATABASE_URL of a PostgreSQL database (make bench starts one)")
    if args.only_telemetry:
        only_telemetry(url, FULL if args.full else QUICK)
        return
    report = run(url, FULL if args.full else QUICK)
    report.write(BENCH / "RESULTS.md", BENCH / "results.png")
    print((BENCH / "RESULTS.md").read_text())


def run(url: str, budget: Budget) -> Report:
    """Every scenario against the PostgreSQL database at `url`, within `budget`."""
    started = time.monotonic()
    settings = service_settings(url)
    engine = create_engine(url)
    seeds: list[SeedRate] = []

    def seed(rows: int) -> None:
        if rate := seed_table(engine, settings, rows):
            seeds.append(rate)

    log("migrating")
    migrate(url)
    seed(THROUGHPUT_ROWS)
    # The variants serve the same list handler from the same database.
    servers = {
        name: start_uvicorn(
            f"bench.apps:{name}", factory=True, cwd=BENCH.parent, env=service_env(url)
        )
        for name in scenarios.VARIANTS
    }
    try:
        for name, server in servers.items():
            server.wait_until_answers(scenarios.VARIANTS[name])
        throughput = scenarios.throughput(servers, budget)
        scroll_load = scenarios.scroll_load(servers, budget)
        telemetry = scenarios.telemetry_cost(servers, budget)
        raw_checks = scenarios.raw_checks(settings, servers)
        latency = scenarios.latency(servers, budget)
        # The service, async and as it was sync, serves the rest.
        for name in [n for n in servers if n not in ("service", "service_sync")]:
            servers.pop(name).stop()
        service, service_sync = servers["service"], servers["service_sync"]

        log("floor: the same SQL through psycopg2")
        floor_page = scenarios.floor(settings, PAGE)
        floor_scroll = scenarios.floor(settings, SCROLL)

        # The table only grows from here, so each size is seeded once. The depth scenario
        # needs DEPTH_ROWS rows whatever the sizes are: it takes its turn among them.
        sizes = sorted(budget.sizes)
        size: dict[int, Series] = {}
        for rows in [r for r in sizes if r <= DEPTH_ROWS]:
            seed(rows)
            size[rows] = scenarios.cursor_page_mid_table(engine, service, budget)
        seed(DEPTH_ROWS)
        depth = scenarios.depth(engine, service, budget)
        for rows in [r for r in sizes if r > DEPTH_ROWS]:
            seed(rows)
            size[rows] = scenarios.cursor_page_mid_table(engine, service, budget)

        # On the largest table of the run.
        counting = scenarios.count_modes(engine, service, service_sync, budget)
        checks = scenarios.count_checks(engine, service)
        memory = scenarios.memory(service, budget.memory_path)
    finally:
        for server in servers.values():
            server.stop()
    log("the operability layers alone, in this process")
    telemetry.layers = telemetry_layers.measure()

    return Report(
        machine=machine(),
        versions=versions(engine),
        budget=budget,
        throughput=throughput,
        scroll_load=scroll_load,
        telemetry=telemetry,
        raw_checks=raw_checks,
        latency=latency,
        floor_page=floor_page,
        floor_scroll=floor_scroll,
        depth=depth,
        size=size,
        counting=counting,
        checks=checks,
        memory=memory,
        seeds=seeds,
        seconds=time.monotonic() - started,
    )


def only_telemetry(url: str, budget: Budget) -> None:
    """`make bench-telemetry`: the operability scenario alone, on the throughput table."""
    settings = service_settings(url)
    engine = create_engine(url)
    migrate(url)
    seed_table(engine, settings, THROUGHPUT_ROWS)
    names = ("service", "service_unobserved", "service_observed")
    servers = {
        name: start_uvicorn(
            f"bench.apps:{name}", factory=True, cwd=BENCH.parent, env=service_env(url)
        )
        for name in names
    }
    try:
        for name, server in servers.items():
            server.wait_until_answers(scenarios.VARIANTS[name])
        cost = scenarios.telemetry_cost(servers, budget)
    finally:
        for server in servers.values():
            server.stop()
    layers = telemetry_layers.measure()
    print("| variant | req/s | server CPU ms/req | cost ms/req | p50 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, series in cost.labelled():
        print(f"| {label} | {series.median('rps'):,.0f} | "
              f"{series.median('cpu_ms_per_request'):.3f} | {cost.cost_ms(series):+.3f} | "
              f"{series.median('p50_ms'):.2f} |")
    print(f"the layers alone, in-process: {layers.bare_us:.1f} -> {layers.observed_us:.1f} us "
          f"CPU per request: {layers.cost_ms:+.3f} ms")
    print("per-round CPU ms/req:", {
        label: [round(run.cpu_ms_per_request, 3) for run in series.runs]
        for label, series in cost.labelled()
    })


if __name__ == "__main__":
    main()
