"""Recorder overhead on CPU: a serving step of the embedded tiny model with and without recording.

    python benchmarks/recorder.py [--steps 200] [--batch 8] [--tokens 64] [--sample-rate 0.1]

A step is the model's forward (which always all-reduces its [L, E] counts for /metrics) plus what the
server does after it; recording adds the copy of the step's counts into the current window and, with
--sample-rate, the sampled tokens' top-k ids. Steps alternate between the two settings, so drift in
the machine's speed hits both alike. Reports the median step time of each and the overhead.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from moeplace.runtime.batch import pad_right
from moeplace.runtime.engine import StepStats
from moeplace.runtime.model import EPModel
from moeplace.runtime.server import Metrics
from moeplace.runtime.tiny import calibration_text, default_model_dir
from moeplace.runtime.tokenizer import ByteTokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sample-rate", type=float, default=0.1)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = EPModel.load(default_model_dir(), None, group=None, device=torch.device("cpu"))
    metrics = Metrics(model, recorder=_recorder(model, args.sample_rate))
    tok = ByteTokenizer()
    prompts = [tok.encode(calibration_text(seed, args.tokens))[: args.tokens] for seed in range(args.batch)]
    ids, mask = pad_right(prompts, tok.pad_id)
    times = {False: [], True: []}
    for i in range(args.steps + 10):
        recording = i % 2 == 1
        metrics.recorder.recording = recording
        start = time.perf_counter()
        model.forward(ids, mask)
        metrics.observe_step(StepStats(0.0, args.batch, int(mask.sum())))
        if i >= 10:  # warm-up
            times[recording].append(time.perf_counter() - start)
    off, on = (float(np.median(times[k])) * 1e3 for k in (False, True))
    out = {"step_ms_without": off, "step_ms_recording": on, "overhead": on / off - 1, "steps_each": args.steps // 2,
           "batch": args.batch, "tokens": args.tokens, "sample_rate": args.sample_rate,
           "windows": metrics.recorder.trace({}).num_windows}
    print(json.dumps(out, indent=1))


def _recorder(model, sample_rate: float):
    from moeplace.runtime.recorder import Recorder

    cfg = model.config
    rec = Recorder(cfg.moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers)
    rec.start(window_seconds=0.05, sample_rate=sample_rate)
    return rec


if __name__ == "__main__":
    main()
