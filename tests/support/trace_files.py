"""Trace files as engines write them, for the reader tests (tests/core/test_readers*.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

RNG = np.random.default_rng(11)


def raises_for(path: Path, problem: str):
    """The error must name the file, then the problem."""
    return pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + problem)


def per_token_dump(tokens_per_pass: list[int], with_ids: bool = True) -> tuple[dict, list[np.ndarray]]:
    """Records as SGLang's per_token mode writes them: 4 layer rows (row 0 dense), 16 experts, 20 slots."""
    import torch

    p2l = np.tile(np.concatenate([np.arange(16), [0, 1, 2, 3]]), (4, 1))  # experts 0..3 have 2 replicas
    records, logical = [], []
    for pass_id, T in enumerate(tokens_per_pass):
        log_TRK = np.stack([np.stack([RNG.permutation(16)[:8] for _ in range(4)]) for _ in range(T)])
        log_TRK[:, 0] = -1
        phys_TRK = np.where((log_TRK < 4) & (RNG.random(log_TRK.shape) < 0.5), log_TRK + 16, log_TRK)
        phys_TRK[:, 0] = -1
        count_RP = np.zeros((4, 20), dtype=np.int64)
        for r in range(1, 4):
            count_RP[r] = np.bincount(phys_TRK[:, r].ravel(), minlength=20)
        record = {"forward_pass_id": pass_id, "rank": 0, "gatherer_key": "primary",
                  "global_physical_count": torch.from_numpy(count_RP)}
        if with_ids:
            record |= {"input_ids": list(range(T)), "positions": list(range(T)), "extend_seq_lens": [T],
                       "forward_mode": 1, "misc_objects": [],
                       "topk_ids_of_layer": torch.from_numpy(phys_TRK.transpose(1, 0, 2).astype(np.int32))}
        records.append(record)
        logical.append(log_TRK)
    return {"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, logical


def write_trtllm(folder: Path, counts_RILE: np.ndarray, iters: list[int], layers: list[int], top_k: int) -> None:
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": counts_RILE.shape[-1], "num_experts_per_token": top_k}))
    for rank, per_rank in enumerate(counts_RILE):
        tensors = {f"{it}_{layer}": per_rank[i, l] for i, it in enumerate(iters) for l, layer in enumerate(layers)}
        save_file(tensors, str(folder / f"rank{rank}.safetensors"))
