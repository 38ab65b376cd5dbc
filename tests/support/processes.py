"""What a running `moeplace serve` is made of, read from /proc: its rank processes, the TCP ports they
listen on, the CPU time they use, and whether any of them is still there."""

from __future__ import annotations

import os
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the ranks of a `moeplace serve` on one node)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(out)


def rank_pids(serve_pid: int) -> list[int]:
    """The rank processes a `moeplace serve` started (those running moeplace.runtime.launch)."""
    return [pid for pid in children(serve_pid) if b"moeplace.runtime.launch" in _cmdline(pid)]


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(pid)
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs or `timeout` seconds passed; those still running."""
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_addresses(pids: list[int]) -> set[str]:
    """'address:port' of every TCP socket in LISTEN state that one of `pids` holds (IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                out.add(_address(cols[1]))
    return out


def _address(hex_address: str) -> str:
    raw, port = hex_address.split(":")
    data = bytes.fromhex(raw)
    if len(data) == 4:
        host = ".".join(str(b) for b in data[::-1])
    else:  # IPv6: four little-endian 32-bit words
        words = [data[i:i + 4][::-1] for i in range(0, 16, 4)]
        host = ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
    return f"{host}:{int(port, 16)}"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
