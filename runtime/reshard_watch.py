"""`Watch`: waits for a layer's transfers (c10d works, or copy works) on a helper thread, noting when each
completed, so that a late one is judged by when it finished, not by when the reshard thread looked.
"""

from __future__ import annotations

import threading
import time

import torch


class Watch:
    """Waits on a helper thread for works [(work, peer or peers)], noting when each completed, so a
    late one is judged by when it finished, not by when someone looked. join() -> why late, or None;
    raises what a work raised. gloo's works complete only in wait() (which blocks; its wait(timeout)
    would close the group). On a GPU, wait() only orders a stream: the thread orders a stream of its
    own after each work and sleeps on a blocking-sync event there, holding no GIL meanwhile (polling
    would take the GIL from the serving thread every few hundred microseconds)."""

    def __init__(self, works: list[tuple], timeout_s: float, device: torch.device,
                 stream: torch.cuda.Stream | None) -> None:
        self.works, self.timeout_s, self.start, self.device = works, timeout_s, time.monotonic(), device
        self.stream = stream  # one of the mover's watch streams (no other watch waits on it meanwhile)
        self.done_at: list[float] = []
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._wait_all, name=f"{threading.current_thread().name}-watch",
                                       daemon=True)
        self.thread.start()

    def _wait_all(self) -> None:
        try:
            if self.device.type != "cuda":
                for work, _ in self.works:
                    work.wait()
                    self.done_at.append(time.monotonic())
                return
            torch.cuda.set_device(self.device)
            with torch.cuda.stream(self.stream) as stream:
                for work, _ in self.works:
                    work.wait()
                    done = torch.cuda.Event(blocking=True)
                    done.record(stream)
                    done.synchronize()
                    self.done_at.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - raised again by join, on the reshard thread
            self.failure.append(exc)

    def join(self) -> str | None:
        self.thread.join()
        if self.failure:
            raise self.failure[0]
        for (_, peer), at in zip(self.works, self.done_at):
            if at - self.start > self.timeout_s:
                late = [peer] if isinstance(peer, int) else peer
                who = f"rank {late[0]}" if len(late) == 1 else f"one of ranks {', '.join(map(str, late))}"
                return f"transfer timed out after {self.timeout_s:g} s waiting on {who}"
        return None
