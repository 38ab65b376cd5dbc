"""The links a reshard is measured against, in the same run (benchmarks/reshard.py): NCCL P2P, copy-engine
peer copies, and the reshard's own expert pulls (`PeerCopies`) in two copy patterns, per GPU, both
directions at once.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist


def nccl_p2p(group, device, nbytes: int) -> float:
    """GB/s per GPU: every rank sends `nbytes` to the next and receives from the previous, at once."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.empty(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)

    def ring():
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % world, group),
               dist.P2POp(dist.irecv, recv, (rank - 1) % world, group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    return nbytes / seconds(ring, device) / 1e9


def copy_engine_p2p(device, nbytes: int) -> float:
    """GB/s of a peer copy from the next GPU into this one on a side stream (copy engines, no SMs),
    both directions at once: rank r pulls from GPU r+1 (this process maps it), every rank together."""
    peer = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
    src = torch.empty(nbytes, dtype=torch.uint8, device=peer)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream, peer_stream = torch.cuda.Stream(device), torch.cuda.Stream(peer)

    def pull():
        with torch.cuda.stream(stream), torch.cuda.stream(peer_stream):
            dst.copy_(src, non_blocking=True)
        peer_stream.synchronize()
        stream.synchronize()

    dist.barrier()
    return nbytes / seconds(pull, device) / 1e9


def copy_engine_experts(device, one, n: int = 64) -> dict:
    """GB/s of pulling n experts from the next GPU with the reshard's own copies (`PeerCopies.pull`), both
    directions at once: from consecutive slots (one copy per weight tensor) and from every other slot (two
    weight copies per expert, the scale tensors in one range copy each, then gathered), on 1 and 2 copy
    streams, each stream's copies in one batched driver call or one call per copy: what the copy pattern
    costs the link, and whether batching or a second stream hides a copy's fixed cost; and every other
    slot's weights alone, one driver call per copy (no scales, no gather)."""
    from moeplace.runtime.reshard_ipc import PeerCopies
    from moeplace.runtime.slots import SlotWeights

    peer = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
    src = SlotWeights.empty_like(SlotWeights(*(t.to(peer) for t in one.tensors())), 2 * n)
    dst = SlotWeights.empty_like(one, n)
    out = {}
    for streams, batch in ((1, True), (2, True), (1, False), (2, False)):
        copies = PeerCopies(device, {peer.index: [src]}, streams, batch)
        how = "batched" if copies.batch else "per_copy"
        for name, src_N in (("consecutive", np.arange(n)), ("every_other_slot", np.arange(0, 2 * n, 2))):
            dist.barrier()
            pull = lambda: copies.pull(peer.index, 0, src_N, dst).synchronize()  # noqa: E731
            out[f"{name}_{streams}_streams_{how}"] = dst.nbytes / seconds(pull, device) / 1e9
    copies = PeerCopies(device, {peer.index: [src]}, 1)
    if copies.driver is not None:  # every other slot, the two weight tensors only: what the small copies cost
        stream = copies.copy_streams[0]

        def weights_only():
            copies.driver.bind(device)
            for d, s in ((dst.w13, src.w13), (dst.w2, src.w2)):
                row = d.stride(0) * d.element_size()
                for i in range(n):
                    copies.driver.copy(d.data_ptr() + i * row, s.data_ptr() + 2 * i * row, row, stream.cuda_stream)
            stream.synchronize()

        dist.barrier()
        out["every_other_slot_weights_only_1_streams_per_copy"] = (dst.w13.nbytes + dst.w2.nbytes) / seconds(
            weights_only, device) / 1e9
    return out


def seconds(fn, device, reps: int = 5) -> float:
    fn()
    sync_stream(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync_stream(device)
    return (time.perf_counter() - start) / reps


def sync_stream(device) -> None:
    """This thread's stream only, as a serving step waits for its own results: a device-wide
    synchronize would also wait for the reshard's transfers on their streams."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
