"""Rank memory of a running `moeplace serve` under a long stream of requests: does it grow, and stop?

    python benchmarks/serve_memory.py --serve-pid PID --url http://127.0.0.1:8000 --requests 3000

Sends `--requests` completions from `--clients` threads in rounds (mixed prompt lengths, greedy and
sampled, streamed and not), and after each round prints every rank's resident memory (VmRSS) and its
growth since the first round. `--cpu-smoke` runs 8 requests in 2 rounds (make test runs it against its
shared server).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import httpx

PROMPTS = ["a", "The expert route of the token", "GPU memory is fast " * 8, "def balance(load):\n" * 20]


def rank_rss_mb(serve_pid: int) -> list[float]:
    """VmRSS (MB) of each rank the `moeplace serve` process started, in pid order."""
    out = []
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != serve_pid or b"moeplace.runtime.launch" not in (entry / "cmdline").read_bytes():
                continue
            rss = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        out.append(int(rss.split()[1]) / 1024)
    return out


def one_round(url: str, requests: int, clients: int, start: int) -> int:
    """`requests` completions (request i: prompt i % 4, sampled when i is odd, streamed when i % 3 == 0);
    how many failed."""
    failed, lock, next_i = [0], threading.Lock(), [start]

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    if next_i[0] >= start + requests:
                        return
                    i, next_i[0] = next_i[0], next_i[0] + 1
                body = {"prompt": PROMPTS[i % 4], "max_tokens": 8 + i % 24, "temperature": 0.8 * (i % 2),
                        "seed": i, "stream": i % 3 == 0}
                r = http.post("/v1/completions", json=body)
                if r.status_code != 200:
                    with lock:
                        failed[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed[0]


def measure(url: str, serve_pid: int, requests: int, rounds: int, clients: int) -> list[dict]:
    rows, first = [], None
    for r in range(rounds):
        failed = one_round(url, requests // rounds, clients, r * (requests // rounds))
        rss = rank_rss_mb(serve_pid)
        first = first or rss
        rows.append({"requests": (r + 1) * (requests // rounds), "failed": failed, "rss_mb": [round(x) for x in rss],
                     "growth_pct": [round(100 * (b / a - 1), 1) for a, b in zip(first, rss)]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--serve-pid", type=int, required=True, help="pid of the `moeplace serve` process")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--cpu-smoke", action="store_true", help="8 requests in 2 rounds")
    a = p.parse_args(argv)
    requests, rounds = (8, 2) if a.cpu_smoke else (a.requests, a.rounds)
    rows = measure(a.url, a.serve_pid, requests, rounds, a.clients)
    if any(row["failed"] for row in rows) or not rows[-1]["rss_mb"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
