"""The runtime's recorder: windows with times and token counts, sampled top-k ids aligned across layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplace.runtime.batch import pad_right
from moeplace.runtime.model import EPModel
from moeplace.runtime.recorder import Recorder
from moeplace.runtime.tokenizer import ByteTokenizer


def test_windows_counts_and_samples(monkeypatch):
    rec = Recorder([1, 2], num_experts=4, top_k=2, num_model_layers=3)
    with pytest.raises(ValueError, match="nothing recorded"):
        rec.trace({})
    rec.add(np.ones((2, 4)), 2)  # not recording: ignored
    rec.start(window_seconds=10, sample_rate=0.5)
    rng = np.random.default_rng(0)
    for step in range(3):
        counts = rng.integers(0, 5, (2, 4)).astype(float)
        rec.add(counts, int(counts[0].sum() // 2), rng.integers(0, 4, (3, 2, 2)))
    trace = rec.trace({"engine": "test"})
    assert trace.num_windows == 1 and trace.time_W is not None
    assert trace.topk_ids_TLK.shape == (9, 2, 2)
    rec.max_samples = 4
    rec.start(window_seconds=10, sample_rate=1.0)
    for _ in range(5):
        rec.add(np.ones((2, 4)), 1, np.zeros((3, 2, 2), dtype=np.int64))
    assert rec.trace({}).topk_ids_TLK.shape[0] == 4  # bounded
    with pytest.raises(ValueError, match="sample_rate"):
        rec.start(sample_rate=2)


def test_sampled_ids_are_the_routed_ids(tiny_dir):
    model = EPModel.load(tiny_dir, None, group=None, device=torch.device("cpu"))
    tok = ByteTokenizer()
    model.forward(*pad_right([tok.encode("expert routing"), tok.encode("hot GPU")], tok.pad_id))
    ids_TLK = model.sampled_topk_ids(1.0, np.random.default_rng(0))
    T = len(tok.encode("expert routing")) + len(tok.encode("hot GPU"))
    assert ids_TLK.shape == (T, len(model.moe_layers), model.config.num_experts_per_tok)
    for row in range(len(model.moe_layers)):  # every sampled selection is one the layer counted
        counts = np.bincount(ids_TLK[:, row].ravel(), minlength=model.config.n_routed_experts)
        assert (counts == model.routed_counts_LE[row].numpy()).all()
    assert model.sampled_topk_ids(0.0, np.random.default_rng(0)) is None
