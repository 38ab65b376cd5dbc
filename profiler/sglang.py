"""SGLang client: record a `Trace` from a running SGLang server through its expert-distribution recorder.

What SGLang offers (read in sgl-project/sglang, summarised in our words):

- `python/sglang/srt/entrypoints/http_server.py` (commit 0025436e): `/start_expert_distribution_record`,
  `/stop_expert_distribution_record` and `/dump_expert_distribution_record`, each registered for GET and
  POST (SGLang's own `test/srt/test_expert_distribution.py` uses POST). Each answers 200 with a one-line
  plain-text body once the schedulers have acted; no data comes back over HTTP. Start clears any earlier
  record; dump writes the record to files and clears it. An exception in the HTTP process is FastAPI's
  plain-text 500; SGLang's own errors are JSON `{"object": "error", "message": ..., "code": ...}`; with
  `--api-key` every path but `/health*` wants `Authorization: Bearer KEY`, else 401
  `{"error": "Unauthorized"}` (`add_api_key_middleware` in sglang.srt.utils). SGLang 0.5.23 adds
  `--admin-api-key` (`python/sglang/srt/utils/auth.py` `decide_request_auth`): the recorder routes are
  "admin optional" (the admin key when one is set, else the API key), `/server_info` is a normal route
  (the API key when one is set), so with both keys each call needs its own. `GET /get_server_info` (renamed
  `/server_info` in newer versions, the old path kept as deprecated) returns the server args, among them
  `expert_distribution_recorder_mode`, `tp_size` and `model_path`.
- `--expert-distribution-recorder-mode` is one of stat, stat_approx, per_pass, per_token and defaults to
  none (`python/sglang/srt/server_args.py`; `--enable-eplb` and `--enable-expert-distribution-metrics`
  turn on stat). Without it the recorder is a no-op whose start/stop/dump raise inside the scheduler
  process instead of answering an HTTP error (`python/sglang/srt/eplb/expert_distribution.py`, commit
  02295fe5), so we read the mode from the server info first and refuse before touching the recorder.
- The dump goes to the server's own disk: `_dump_to_file` in that file `torch.save`s into
  `SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR` (`python/sglang/srt/environ.py`, default `/tmp`), created if
  missing. stat/stat_approx: rank 0 writes `expert_distribution_recorder_{time}.pt`, counts already summed
  over ranks. per_pass/per_token: every rank writes `expert_distribution_recorder_{time}_{rank}.pt`, rank
  being the TP rank (`python/sglang/srt/model_executor/model_runner.py`), each file holding that rank's
  forward passes. The formats are described in `moeplace.sglang_dump`, which reads them.
- stat modes keep a ring of `--expert-distribution-recorder-buffer-size` passes (`_CircularBuffer` in
  expert_distribution.py; `arg_groups/parallel_hook.py` sets it to --eplb-rebalance-num-iterations, 1000
  by default, even without EPLB; -1 = unbounded): a longer recording keeps only the last passes. The
  trace then says so in its metadata (`warnings`), with the number of passes kept.

So the client must see the server's dump folder (`dump_dir`: the same machine, or a shared folder that
every rank writes to). It notes which dump files exist before the start, and after the dump waits for new
ones (the ranks other than the one answering HTTP may still be writing). Files are told apart by name, not
by clock, so a shared folder with skewed clocks works. SGLang's files stay where SGLang wrote them.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import httpx

from moeplace.sglang_dump import read_sglang_dump, read_sglang_rank_dumps
from moeplace.trace import Trace

STAT_MODES = ("stat", "stat_approx")
PER_RANK_MODES = ("per_pass", "per_token")
DEFAULT_DUMP_DIR = "/tmp"  # SGLang's default for SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR
_DUMP_FILE = re.compile(r"expert_distribution_recorder_(\d+(?:\.\d+)?)(?:_(\d+))?\.pt")
_POLL_SECONDS = 0.05


def record_sglang(
    url: str,
    duration: float,
    *,
    dump_dir: Path | None = None,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    timeout: float = 30,
    top_k: int | None = None,
) -> Trace:
    """Record `duration` seconds of expert load on the SGLang server at `url` and return it as a `Trace`.

    dump_dir: the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR as seen from here (default: that
        variable in this environment, else /tmp). timeout: seconds per HTTP call and for the dump files
        to appear. top_k: the model's top-k, needed for stat dumps of models other than DeepSeek-V3
        (per-token dumps show it). api_key / admin_api_key: the server's --api-key / --admin-api-key.
        Every failure is a `ValueError` naming the URL or the file.
    """
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a non-negative number of seconds, got {duration}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url}: the URL must start with http:// or https://")
    url = url.rstrip("/")
    folder = Path(dump_dir or os.environ.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", DEFAULT_DUMP_DIR))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: dump_dir is a file, not the folder SGLang dumps into")
    recorder_key = admin_api_key or api_key
    headers = {"Authorization": f"Bearer {recorder_key}"} if recorder_key else {}
    info_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=timeout) as http:
        # 1. what the server records, before touching the recorder
        info = _server_info(http, url, info_headers)
        mode = _recorder_mode(info, url)
        if mode in PER_RANK_MODES and info.get("pp_size", 1) != 1:
            # each pipeline stage numbers its files by TP rank, so the stages' files cannot be told apart
            raise ValueError(f"{url}: {mode} dumps of a pipeline-parallel server (pp_size {info['pp_size']}) "
                             "are not supported; record with --expert-distribution-recorder-mode stat")
        before = _dump_files(folder)
        # 2. record; stop is sent even when the wait is interrupted, so the server does not record on
        started = time.time()
        _call(http, url, "/start_expert_distribution_record", headers=headers)
        try:
            time.sleep(duration)
        finally:
            _call(http, url, "/stop_expert_distribution_record", headers=headers)
        stopped = time.time()
        _call(http, url, "/dump_expert_distribution_record", headers=headers)
    # 3. read what the dump wrote
    ranks = 1 if mode in STAT_MODES else _positive_int(info.get("tp_size", 1), "tp_size", url)
    files = _wait_for_dump(folder, before, mode, ranks, timeout, url)
    trace = read_sglang_dump(files[0], top_k=top_k) if mode in STAT_MODES else read_sglang_rank_dumps(files, top_k=top_k)
    metadata = dict(trace.metadata)
    metadata.update(
        engine="sglang",
        url=url,
        recorder_mode=mode,
        recorded_from=_iso(started),
        recorded_until=_iso(stopped),
        duration_s=f"{stopped - started:.3f}",
        dump_files=", ".join(f.name for f in files),
    )
    if info.get("model_path"):
        metadata["model"] = str(info["model_path"])
    full = _ring_full(info, mode, trace.num_windows)
    if full:
        metadata["warnings"] = full
    return replace(trace, metadata=metadata, source=f"{url} ({folder})")


def _ring_full(info: dict, mode: str, kept: int) -> str | None:
    """A warning when the stat recorder's ring of passes was full (older passes were overwritten)."""
    size = info.get("expert_distribution_recorder_buffer_size")
    if mode not in STAT_MODES or isinstance(size, bool) or not isinstance(size, int) or size <= 0 or kept < size:
        return None
    return (f"SGLang's recorder ring was full: the trace keeps the last {kept} forward passes of a longer "
            f"recording (--expert-distribution-recorder-buffer-size {size}); record for less time, or restart "
            "SGLang with a larger --expert-distribution-recorder-buffer-size (-1: unbounded)")


def _wait_for_dump(folder: Path, before: dict[str, tuple], mode: str, ranks: int, timeout: float, url: str) -> list[Path]:
    """The dump files written since `before`: the newest stat file, or the newest file of each rank 0..ranks-1.

    Waits until they are all there and their size stopped changing (torch.save writes in place).
    """
    deadline = time.monotonic() + timeout
    previous: dict[str, tuple] | None = None
    while True:
        new = {name: stamp for name, stamp in _dump_files(folder).items() if before.get(name) != stamp}
        chosen = _choose(new, mode, ranks)
        current = {name: new[name] for name in chosen}
        if len(chosen) == ranks and current == previous:
            return [folder / name for name in chosen]
        previous = current
        if time.monotonic() > deadline:
            break
        time.sleep(_POLL_SECONDS)
    if not chosen:
        raise ValueError(
            f"{url}: no dump file expert_distribution_recorder_*.pt appeared in {folder} within {timeout:g} s "
            "of /dump_expert_distribution_record; dump_dir must be the server's "
            "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR (default /tmp) as seen from this machine"
        )
    if len(chosen) < ranks:
        got = sorted(int(_DUMP_FILE.fullmatch(name).group(2)) for name in chosen)
        raise ValueError(
            f"{url}: only ranks {got} of the {ranks} tensor-parallel ranks wrote a dump file in {folder} within "
            f"{timeout:g} s; the folder must receive every rank's file (shared across nodes)"
        )
    raise ValueError(f"{url}: dump files in {folder} were still being written after {timeout:g} s")


def _choose(new: dict[str, tuple], mode: str, ranks: int) -> list[str]:
    """Names to read among the new dump files: the newest per rank (stat: one file, rank 0's)."""
    newest: dict[int, tuple[float, str]] = {}
    for name in new:
        match = _DUMP_FILE.fullmatch(name)
        has_rank = match.group(2) is not None
        if has_rank != (mode in PER_RANK_MODES):
            continue  # a file of the other format, from an earlier server run
        rank = int(match.group(2)) if has_rank else 0
        stamp = float(match.group(1))
        if rank < ranks and stamp >= newest.get(rank, (-1.0, ""))[0]:
            newest[rank] = (stamp, name)
    return [newest[rank][1] for rank in sorted(newest)]


def _dump_files(folder: Path) -> dict[str, tuple]:
    """{name: (size, mtime_ns)} of the SGLang dump files in `folder` (none if it does not exist yet)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise ValueError(f"{folder}: cannot list the dump folder ({exc.strerror})") from None
    files = {}
    for entry in entries:
        if _DUMP_FILE.fullmatch(entry.name) and entry.is_file():
            stat = entry.stat()
            files[entry.name] = (stat.st_size, stat.st_mtime_ns)
    return files


def _server_info(http: httpx.Client, url: str, headers: dict[str, str]) -> dict:
    """The server args (newer SGLang: /server_info; older: /get_server_info), with the API key."""
    response = _call(http, url, "/server_info", method="GET", missing_ok=True, headers=headers)
    path = "/server_info"
    if response is None:
        path = "/get_server_info"
        response = _call(http, url, path, method="GET", headers=headers)
    try:
        info = response.json()
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ValueError(f"{url}{path}: expected a JSON object of server args; is this an SGLang server?")
    return info


def _recorder_mode(info: dict, url: str) -> str:
    if "expert_distribution_recorder_mode" not in info:
        raise ValueError(f"{url}: the server info has no 'expert_distribution_recorder_mode'; "
                         "not an SGLang server with the expert-distribution recorder")
    mode = info["expert_distribution_recorder_mode"]
    if mode is None:
        raise ValueError(f"{url}: SGLang was started without --expert-distribution-recorder-mode, so it records "
                         "nothing; restart it with --expert-distribution-recorder-mode stat (or per_pass, per_token)")
    if mode not in STAT_MODES + PER_RANK_MODES:
        raise ValueError(f"{url}: unknown expert_distribution_recorder_mode {mode!r} "
                         f"(this client reads {', '.join(STAT_MODES + PER_RANK_MODES)})")
    return mode


def _call(http: httpx.Client, url: str, path: str, method: str = "POST", missing_ok: bool = False,
          headers: dict[str, str] | None = None) -> httpx.Response | None:
    try:
        response = http.request(method, path, headers=headers)
    except httpx.TimeoutException:
        raise ValueError(f"{url}{path}: no answer within {http.timeout.read:g} s") from None
    except httpx.HTTPError as exc:
        raise ValueError(f"{url}{path}: cannot reach the server ({exc.__class__.__name__}: {exc})") from None
    if missing_ok and response.status_code == 404:
        return None
    if response.status_code >= 400:
        raise ValueError(f"{url}{path}: HTTP {response.status_code}: {_reason(response)}")
    return response


def _reason(response: httpx.Response) -> str:
    """The server's message: SGLang's {"message": ...}, {"error": ...} (also nested), FastAPI's {"detail": ...}, or text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, dict) and "message" in value:
                value = value["message"]
            if value:
                return str(value)[:200]
    return response.text.strip()[:200]


def _positive_int(value: object, field: str, url: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{url}: server info field '{field}' must be a positive integer, got {value!r}")
    return value


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")
