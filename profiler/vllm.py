"""vLLM client: a `Trace` with per-token samples from a running vLLM server's routed experts.

What vLLM 0.33.0 offers (read in its wheel, summarised in our words):

- Started with `--enable-return-routed-experts` (`vllm/config/aux_output.py`), its OpenAI server puts
  `routed_experts` in every completion choice (`entrypoints/openai/completion/protocol.py`
  `CompletionResponseChoice`): a base64 string of `.npy` bytes (`utils/serial_utils.py` `numpy2base64`,
  `np.save(allow_pickle=False)`), an array [tokens - 1, layers, top_k] of LOGICAL expert ids (the router
  captures them before the EPLB mapping, `router/base_router.py`), dtype uint8 for <= 256 experts
  else uint16. "tokens - 1": the last sampled token was never forwarded. `null` when the server runs
  without the flag. The request field `routed_experts_prompt_start` (default 0) skips prompt tokens.
- `layers` is the model's total hidden layers (`routed_experts_capturer.py`: one row per layer id,
  61 for DeepSeek-V3); rows of dense layers are never written and stay 0 in its zeroed buffer. A real
  MoE row never repeats an expert within a token, so a row whose every token repeats one id is dense.
- vLLM cannot load a placement (`moeplace export --format vllm` is informational), but this gives
  the real routing, token by token, for `solve` and for the traffic measure.

Each request is one window; every routed token is a per-token sample.
Dimension letters: W windows (requests), T tokens, R layer rows (all model layers), K top-k, E experts.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable

import httpx
import numpy as np

from moeplace.readers import _build_trace
from moeplace.trace import Trace


def profile_vllm(
    url: str,
    prompts: list[str],
    *,
    max_tokens: int = 16,
    api_key: str | None = None,
    model: str | None = None,
    num_experts: int | None = None,
    timeout: float = 600,
    progress: Callable[[int, int], None] | None = None,
) -> Trace:
    """Send each prompt to the vLLM server at `url` (greedy, `max_tokens` new tokens) and build a trace
    from the routed experts it returns. num_experts: the model's routed experts (default: 256 for
    DeepSeek-V3's shape, 61 layers of top-8; required otherwise). ValueError naming the URL or field."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url}: the URL must start with http:// or https://")
    if not prompts:
        raise ValueError("no prompts to send")
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ids_per_request = []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
        model = model or _served_model(http, url)
        for i, prompt in enumerate(prompts):
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            ids_per_request.append(_routed_experts(_post(http, url, "/v1/completions", body), url, i))
            if progress:
                progress(i + 1, len(prompts))
    return _trace(ids_per_request, url, model, num_experts)


def decode_routed_experts(text: object, where: str) -> np.ndarray:
    """[T, R, K] int64 from vLLM's base64 `.npy` string; ValueError naming `where` when malformed."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'routed_experts' must be a base64 string, got {type(text).__name__}")
    try:
        array = np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{where}: 'routed_experts' is not base64 .npy data ({exc})") from None
    if array.ndim != 3 or array.dtype.kind not in "iu":
        raise ValueError(f"{where}: 'routed_experts' must be integers [tokens, layers, top_k], "
                         f"got {array.dtype} {list(array.shape)}")
    return array.astype(np.int64)


def _served_model(http: httpx.Client, url: str) -> str:
    data = _get(http, url, "/v1/models")
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ValueError(f"{url}/v1/models: no served model in the answer; is this a vLLM server?")
    return str(models[0]["id"])


def _routed_experts(answer: object, url: str, i: int) -> np.ndarray:
    where = f"{url}/v1/completions (prompt {i})"
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(f"{where}: the answer has no choices")
    text = choices[0].get("routed_experts")
    if text is None:
        raise ValueError(f"{where}: the answer has no 'routed_experts': start vLLM with "
                         "--enable-return-routed-experts")
    return decode_routed_experts(text, where)


def _trace(ids_per_request: list[np.ndarray], url: str, model: str, num_experts: int | None) -> Trace:
    shapes = {ids.shape[1:] for ids in ids_per_request}
    if len(shapes) > 1:
        raise ValueError(f"{url}: requests returned routed experts of different shapes {sorted(shapes)}")
    (R, K), = shapes
    E = num_experts or (256 if (R, K) == (61, 8) else None)
    if E is None:
        raise ValueError(f"{url}: routed experts of {R} layers x top-{K} are not DeepSeek-V3's; give the model's "
                         "number of routed experts (--num-experts)")
    ids_TRK = np.concatenate(ids_per_request)
    if len(ids_TRK) and ids_TRK.max() >= E:
        raise ValueError(f"{url}: routed expert id {int(ids_TRK.max())} is not below num_experts {E}")
    dense_R = _dense_rows(ids_TRK, K)
    ids_TRK[:, dense_R] = -1
    counts_WRE = np.zeros((len(ids_per_request), R, E))
    start = 0
    for w, ids in enumerate(ids_per_request):
        chunk = ids_TRK[start:start + len(ids)]
        start += len(ids)
        for r in np.flatnonzero(~dense_R):
            counts_WRE[w, r] = np.bincount(chunk[:, r].ravel(), minlength=E)
    meta = {"engine": "vllm", "format": "vllm routed_experts", "url": url,
            "recorded_until": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    tokens_W = np.array([len(ids) for ids in ids_per_request], dtype=np.float64)
    trace = _build_trace(_Source(url), counts_WRE, meta, window_names=[f"request {w}" for w in range(len(tokens_W))],
                         topk_ids_TRK=ids_TRK, tokens_W=tokens_W, num_model_layers=R, top_k=K)
    return replace(trace, metadata=dict(trace.metadata, model=model), source=url)


def _dense_rows(ids_TRK: np.ndarray, K: int) -> np.ndarray:
    """[R] rows vLLM never wrote (dense layers): every token repeats one id there (all zeros)."""
    if K == 1:
        return (ids_TRK[:, :, 0] == 0).all(axis=0)
    return (ids_TRK == ids_TRK[:, :, :1]).all(axis=(0, 2))


class _Source(str):
    """`_build_trace` takes a path for its messages; a URL has a `.name` of its own."""

    @property
    def name(self) -> str:
        return str(self)


def _get(http: httpx.Client, url: str, path: str) -> object:
    return _answer(_send(http, url, path, "GET", None), url, path)


def _post(http: httpx.Client, url: str, path: str, body: dict) -> object:
    return _answer(_send(http, url, path, "POST", body), url, path)


def _send(http: httpx.Client, url: str, path: str, method: str, body: dict | None) -> httpx.Response:
    try:
        return http.request(method, path, json=body)
    except httpx.TimeoutException:
        raise ValueError(f"{url}{path}: no answer within {http.timeout.read:g} s") from None
    except httpx.HTTPError as exc:
        raise ValueError(f"{url}{path}: cannot reach the server ({exc.__class__.__name__}: {exc})") from None


def _answer(response: httpx.Response, url: str, path: str) -> object:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        reason = data.get("error", data.get("message", data)) if isinstance(data, dict) else response.text[:200]
        if isinstance(reason, dict):
            reason = reason.get("message", reason)
        raise ValueError(f"{url}{path}: HTTP {response.status_code}: {str(reason)[:200]}")
    if data is None:
        raise ValueError(f"{url}{path}: the answer is not JSON")
    return data
