"""The full loop's steps that talk to processes (benchmarks/full_loop.py): a command run with its output kept,
the profile of the running server, the greedy answers to fixed prompts, the GPUs' names.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def fixed_answers(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions of `prompts`, one after another (the server's default temperature is 0)."""
    import httpx

    out = []
    for prompt in prompts:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=900)
        if r.status_code != 200:
            raise SystemExit(f"fixed prompt refused: HTTP {r.status_code} {r.text[:500]}")
        out.append(r.json()["choices"][0]["text"])
    return out


def profile(args, url: str, cli: list[str], out: Path, env: dict, load) -> dict:
    """`moeplace profile` for --profile-seconds; the engine's mean step time and the requests over it."""
    sent, metrics = load.sent, step_metrics(url)
    run_cli(cli + ["profile", "--url", url, "--duration", str(args.profile_seconds), "-o", str(out)], env,
         out.with_suffix(".log"))
    after = step_metrics(url)
    steps = after[1] - metrics[1]
    return {"trace": str(out), "requests": load.sent - sent, "engine_steps": steps,
            "engine_step_ms_mean": 1e3 * (after[0] - metrics[0]) / steps if steps else None}


def step_metrics(url: str) -> tuple[float, float]:
    """(sum of engine step seconds, steps) from the server's Prometheus histogram; (0, 0) if absent."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=60).text
    value = lambda name: re.search(rf"^{name} (\S+)$", text, re.M)  # noqa: E731
    found = value("moeplace_step_seconds_sum"), value("moeplace_step_seconds_count")
    return (float(found[0][1]), float(found[1][1])) if all(found) else (0.0, 0.0)


def run_cli(command: list[str], env: dict, log: Path) -> str:
    """Run a command, its output shown as it comes and kept in `log`; SystemExit with its tail on failure."""
    print("$", " ".join(command[2:]), flush=True)
    lines = []
    with open(log, "w") as f:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                print("  " + line, end="", flush=True)
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted (SIGTERM from `timeout`)
                proc.kill()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[2:4])} failed (exit {proc.returncode}):\n{''.join(lines)[-3000:]}")
    return "".join(lines)


def device_name(device: str) -> str:
    """The GPUs' names (nvidia-smi: this process creates no CUDA context, whose memory GPU 0 would lose)."""
    if device == "cpu":
        return "cpu"
    names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.split("\n")
    names = [n.strip() for n in names if n.strip()]
    return f"{names[0]} x{len(names)}" if names else "cuda (nvidia-smi gave no names)"


def jsonable(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
