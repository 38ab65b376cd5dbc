"""A real HTTP server speaking SGLang's expert-distribution API, for the record_sglang tests.

SGLang itself needs a GPU, so the server here is a FastAPI app on 127.0.0.1 that answers the three
recorder endpoints the way sgl-project/sglang `http_server.py` does (GET and POST, 200 with one line of
plain text, JSON errors, Bearer API key) and on dump `torch.save`s files in SGLang's formats and names into
a folder, per-rank files of per_token mode arriving late like those of ranks that do not answer HTTP.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


ENDPOINTS = {
    "/start_expert_distribution_record": "Start recording the expert distribution.\n",
    "/stop_expert_distribution_record": "Stop recording the expert distribution.\n",
    "/dump_expert_distribution_record": "Dump expert distribution record.\n",
}


LATE_RANK_SECONDS = 0.2


class FakeSGLang:
    """What the fake server answers and what its dump writes; tests set the fields."""

    def __init__(self) -> None:
        self.configure(Path("/nonexistent"))

    def configure(self, folder: Path, mode: str | None = "stat", tp_size: int = 1, dump=None) -> None:
        self.folder, self.mode, self.tp_size = folder, mode, tp_size
        self.dump = dump or {}  # {rank: object to torch.save}; a rank of None = the stat file (no rank suffix)
        self.raw: bytes | None = None  # written as the stat file instead, when set
        self.fail: dict[str, Response] = {}
        self.api_key: str | None = None
        self.admin_api_key: str | None = None  # SGLang 0.5.23's --admin-api-key
        self.buffer_size: int | None = None  # --expert-distribution-recorder-buffer-size in the server info
        self.calls: list[tuple[str, str, int]] = []

    def write_dump(self) -> None:
        def save(rank, obj):
            suffix = "" if rank is None else f"_{rank}"
            torch.save(obj, self.folder / f"expert_distribution_recorder_{time.time()}{suffix}.pt")

        if self.raw is not None:
            (self.folder / f"expert_distribution_recorder_{time.time()}.pt").write_bytes(self.raw)
        for rank, obj in self.dump.items():
            if rank:  # ranks other than 0 finish after the HTTP answer
                threading.Timer(LATE_RANK_SECONDS, save, (rank, obj)).start()
            else:
                save(rank, obj)


def sglang_app(state: FakeSGLang) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def log_and_authenticate(request: Request, call_next):
        # SGLang 0.5.23's rules (utils/auth.py): the recorder routes are "admin optional" (the admin key
        # when set, else the API key); the rest, /server_info included, want the API key when set.
        if request.url.path in ENDPOINTS:
            key = state.admin_api_key or state.api_key
        else:
            key = state.api_key
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            response = JSONResponse({"error": "Unauthorized"}, status_code=401)
        else:
            response = await call_next(request)
        state.calls.append((request.method, request.url.path, response.status_code))
        return response

    # Older SGLang: /get_server_info only (newer ones add /server_info), so the client's fallback runs.
    @app.get("/get_server_info")
    async def get_server_info():
        info = {"model_path": "deepseek-ai/DeepSeek-V3", "tp_size": state.tp_size, "dp_size": 1, "ep_size": state.tp_size,
                "expert_distribution_recorder_mode": state.mode, "internal_states": [{}], "version": "fake"}
        if state.buffer_size is not None:
            info["expert_distribution_recorder_buffer_size"] = state.buffer_size
        return info

    def endpoint(path: str, text: str):
        def handle():
            if path in state.fail:
                return state.fail[path]
            if path == "/dump_expert_distribution_record":
                state.write_dump()
            return Response(content=text, status_code=200)

        app.api_route(path, methods=["GET", "POST"])(handle)

    for path, text in ENDPOINTS.items():
        endpoint(path, text)
    return app


def stat_dump(rng: np.random.Generator, steps: int = 3) -> dict:
    """SGLang stat dump of DeepSeek-V3: logical_count int32 [steps, 61, 256], dense layers 0..2 zero."""
    counts = rng.integers(0, 100, size=(steps, 61, 256)).astype(np.int32)
    counts[:, :3] = 0
    return {"rank": 0, "logical_count": torch.from_numpy(counts), "average_utilization_rate_over_window": None}


def per_token_dump(rng: np.random.Generator, rank: int, p2l_RP: np.ndarray, passes: int = 3, top_k: int = 2) -> dict:
    """SGLang per_token dump of one rank: physical top-k ids [R, T, 8] (-1 padded, row 0 dense) and their counts."""
    R, P = p2l_RP.shape
    records = []
    for pass_id in range(passes):
        T = int(rng.integers(1, 6))
        ids = np.full((R, T, 8), -1, dtype=np.int32)
        for r in range(1, R):
            for t in range(T):
                slots = rng.choice(P, size=top_k, replace=False)
                while len(set(p2l_RP[r, slots])) < top_k:  # a token picks distinct logical experts
                    slots = rng.choice(P, size=top_k, replace=False)
                ids[r, t, :top_k] = slots
        physical_RP = np.stack([np.bincount(ids[r][ids[r] >= 0], minlength=P) for r in range(R)]).astype(np.int32)
        records.append(dict(forward_pass_id=100 + pass_id, rank=rank, gatherer_key="primary",
                            input_ids=rng.integers(0, 1000, T).tolist(), positions=list(range(T)),
                            extend_seq_lens=[T], forward_mode=1, misc_objects=[],
                            topk_ids_of_layer=torch.from_numpy(ids), global_physical_count=torch.from_numpy(physical_RP)))
    return {"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l_RP)}


def logical_counts(dumps: list[dict], p2l_RP: np.ndarray, num_experts: int) -> np.ndarray:
    """Expected [passes, R, E] from the per-token ids the server wrote, computed without the client."""
    R = p2l_RP.shape[0]
    out = []
    for records in zip(*(d["records"] for d in dumps)):
        counts = np.zeros((R, num_experts))
        for record in records:
            ids = record["topk_ids_of_layer"].numpy()
            for r in range(R):
                used = ids[r][ids[r] >= 0]
                counts[r] += np.bincount(p2l_RP[r, used], minlength=num_experts)
        out.append(counts)
    return np.stack(out)


def redundant_map(rng: np.random.Generator, R: int = 4, E: int = 8, P: int = 10) -> np.ndarray:
    return np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, P - E)]) for _ in range(R)])
