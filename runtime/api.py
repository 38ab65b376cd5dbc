"""The OpenAI-style request bodies: what is accepted, and how it becomes a prompt and SamplingParams.

`/v1/completions` and `/v1/chat/completions` take OpenAI's field names and types (strictly: "0.5" is not
a number). A field OpenAI defines that this server does not implement is accepted only at the value
that means "off" (n = 1, logprobs null, ...), otherwise 400 naming it; a field OpenAI does not define
is a 400 too. Differences from OpenAI, by design: temperature defaults to 0 (greedy, reproducible),
max_tokens to 16 for both endpoints.

Bodies are parsed strictly (`parse_json`): NaN / Infinity literals and nesting beyond Python's
recursion limit are refused before any validation.
"""

from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeplace.runtime.sampling import SamplingParams

MAX_CHAT_MESSAGES = 256
# OpenAI fields this server does not implement, and the values that mean "not used".
NEUTRAL = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False), "top_logprobs": (None,),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}


class BadRequest(ValueError):
    """A request body this server refuses: answered 400 with the message."""


def parse_json(body: bytes) -> object:
    """The JSON value of a request body; BadRequest for anything but strict JSON (no NaN/Infinity)."""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"body is not JSON ({str(exc)[:120]})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping: accepted, unused
    n: object = None
    presence_penalty: object = None
    frequency_penalty: object = None
    logit_bias: object = None
    logprobs: object = None

    def sampling(self) -> SamplingParams:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=stop)

    def unsupported(self) -> str | None:
        """The first field set to a value this server does not implement, as a message."""
        for name in NEUTRAL:
            value = getattr(self, name, None)
            if not any(_same(value, neutral) for neutral in NEUTRAL[name]):
                shown = " or ".join(json.dumps(v) for v in NEUTRAL[name])
                return f"{name}: {json.dumps(value)[:60]} is not supported by this server (only {shown})"
        return None


class CompletionRequest(_Common):
    prompt: str
    best_of: object = None
    echo: object = None
    suffix: object = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: int | None = None
    top_logprobs: object = None
    tools: object = None
    tool_choice: object = None
    response_format: object = None

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        if self.max_completion_tokens is None:
            return params
        return SamplingParams(max_tokens=self.max_completion_tokens, temperature=params.temperature,
                              top_p=params.top_p, seed=params.seed, stop=params.stop)

    def prompt(self) -> str:
        """A plain chat template (the embedded model was never taught one): "Role: text" paragraphs,
        then "Assistant:" for the answer."""
        turns = [f"{'System' if m.role == 'developer' else m.role.capitalize()}: {m.text}" for m in self.messages]
        return "\n\n".join(turns) + "\n\nAssistant:"


def validate(model: type[_Common], data: object) -> _Common:
    """`data` as a `model` request; BadRequest naming the first wrong field."""
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc.errors())) from None
    if (problem := request.unsupported()) is not None:
        raise BadRequest(problem)
    return request


def describe(errors: list) -> str:
    """pydantic's first error as 'field.path: message'."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    if first.get("type") == "extra_forbidden":
        return f"{where}: unknown field (not part of this API)"
    return f"{where}: {first.get('msg', 'invalid value')}"


def _same(value: object, neutral: object) -> bool:
    """Equal and of the same JSON kind (True is not 1, 0 is 0.0)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return type(value) in (int, float) and type(neutral) in (int, float) and value == neutral or \
        value == neutral and type(value) is type(neutral)
