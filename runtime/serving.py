"""Rank 0's process: the engine thread and the HTTP server (uvicorn), started and stopped together.

- Ready: once the port is bound, one line on stdout: URL, ranks, device, model, slots per GPU,
  redundant slots.
- Stop (SIGTERM/SIGINT): the engine stops after its current step, fails every in-flight request
  (clients get a 503 or a stream error, never silence) and tells the other ranks to stop; uvicorn
  closes within `SHUTDOWN_S`. Exit 0.
- The engine thread dies: one log line, the HTTP server closes, exit 1, so the supervisor (and a
  process manager above it) sees a dead server rather than one that answers 503 forever.
- Slow clients: a connection whose request (headers and body) is not complete `--read-timeout` seconds
  after its first byte (or after it opened) is closed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

SHUTDOWN_S = 3.0  # uvicorn's grace for open connections once every request has its answer
log = logging.getLogger("moeplace.serve")


def serve(config, model, tokenizer, control, resharder, stop, world: int) -> int:
    """Serve until a stop signal (exit code 0) or the engine's death (1)."""
    from moeplace.runtime.engine import Engine
    from moeplace.runtime.launch import engine_config
    from moeplace.runtime.server import create_app

    engine = Engine(model, engine_config(config), control, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    resharder=resharder)
    app = create_app(engine, model, tokenizer, model_name=config.model_name, api_key=config.api_key,
                     resharder=resharder)
    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                   access_log=config.log_level in ("info", "debug"), http=_with_timeout(config.read_timeout),
                                   timeout_graceful_shutdown=SHUTDOWN_S, lifespan="off"),
                    ready_line=_ready_line(config, model, world))

    def shut_down() -> None:  # in the main thread (signal handler) or the engine thread (failure)
        engine.stop()
        server.should_exit = True

    failed = threading.Event()

    def run_engine() -> None:
        try:
            engine.run()
        except BaseException as exc:  # noqa: BLE001 - reported in one line, then the whole server goes
            if stop.received is None:
                failed.set()
                print(f"error: the engine stopped: {exc.__class__.__name__}: {exc}"[:1000], file=sys.stderr, flush=True)
        finally:
            server.should_exit = True

    stop.on_stop = shut_down
    loop = threading.Thread(target=run_engine, name="engine", daemon=True)
    loop.start()
    try:
        server.run()
    finally:
        engine.stop()
        loop.join(timeout=SHUTDOWN_S)
    return 1 if failed.is_set() or not server.started or loop.is_alive() else 0


def _ready_line(config, model, world: int) -> str:
    topology = model.placement.topology
    redundant = topology.num_slots - model.placement.num_experts
    host = f"[{config.host}]" if ":" in config.host else config.host
    return (f"moeplace serve: ready at http://{host}:{config.port} ({world} rank(s) on {config.device}, "
            f"model {config.model_name}, {topology.slots_per_gpu} slots per GPU, {redundant} redundant)")


class Server(uvicorn.Server):
    """uvicorn without its own signal handling (launch.StopSignal owns it), printing the ready line once."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self.ready_line = ready_line

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            print(self.ready_line, flush=True)


def _with_timeout(seconds: float) -> type:
    return type("SlowClientTimeouts", (SlowClientTimeouts,), {"read_timeout": seconds})


class SlowClientTimeouts(H11Protocol):
    """uvicorn's h11 protocol with a read deadline: a request must arrive whole (headers and body) within
    `read_timeout` seconds of its first byte, and a new connection must start one as soon. A
    request read whole is never cut (a long generation or stream), and an idle keep-alive connection
    is left to uvicorn's keep-alive timeout."""

    read_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline, self._served = None, 0
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is None and self.conn.their_state is not h11.DONE:
            self._arm()

    def on_response_complete(self) -> None:
        self._served += 1
        self._disarm()  # the next request gets its own read_timeout from its first byte
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        state, partial = self.conn.their_state, bool(self.conn.trailing_data[0])
        if self.transport.is_closing() or not (state is h11.SEND_BODY or state is h11.IDLE and
                                                (partial or not self._served)):
            return
        log.info("closing %s: no complete request within %.1f s", self.client, self.read_timeout)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()
