"""`Topology`: the GPUs of an expert-parallel deployment and the slots each holds.

Slot `p` lives on GPU `p // slots_per_gpu`; GPU `g` on node `g // gpus_per_node`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moeplace.checks import check_positive_int

# One DeepSeek-V3 expert: gate/up [2048, 7168] + down [7168, 2048] FP8 and their float32
# 128x128-block scales (DESIGN.md, facts).
DEEPSEEK_V3_EXPERT_BYTES = 3 * 2048 * 7168 + 3 * 16 * 56 * 4


@dataclass(frozen=True)
class Topology:
    """num_gpus GPUs in nodes of gpus_per_node, each holding slots_per_gpu expert copies.

    gpu_memory_budget: optional bytes each GPU may spend on expert slots (checked against
    slots_per_gpu * expert_bytes). nvlink_gbps / network_gbps: link bandwidths in GB/s used for
    transfer-time estimates (intra-node defaults to the NCCL P2P measured on 4xH200).
    """

    num_gpus: int
    gpus_per_node: int
    slots_per_gpu: int
    expert_bytes: int = DEEPSEEK_V3_EXPERT_BYTES
    gpu_memory_budget: int | None = None
    nvlink_gbps: float = 298.0
    network_gbps: float = 50.0

    def __post_init__(self) -> None:
        src = "topology"
        check_positive_int(src, "num_gpus", self.num_gpus)
        check_positive_int(src, "gpus_per_node", self.gpus_per_node)
        check_positive_int(src, "slots_per_gpu", self.slots_per_gpu)
        check_positive_int(src, "expert_bytes", self.expert_bytes)
        if self.num_gpus % self.gpus_per_node:
            raise ValueError(
                f"{src}: num_gpus {self.num_gpus} is not a multiple of gpus_per_node {self.gpus_per_node}"
            )
        if self.gpu_memory_budget is not None:
            need = self.slots_per_gpu * self.expert_bytes
            if need > self.gpu_memory_budget:
                fit = self.gpu_memory_budget // self.expert_bytes
                raise ValueError(
                    f"{src}: {self.slots_per_gpu} slots per GPU x {self.expert_bytes} bytes per expert = "
                    f"{need} bytes exceeds the GPU memory budget of {self.gpu_memory_budget} bytes "
                    f"(it fits {fit} slots)"
                )
        for name in ("nvlink_gbps", "network_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{src}: field '{name}' must be positive, got {getattr(self, name)!r}")

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, source: str = "topology") -> Topology:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: 'topology' must be an object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown topology field(s) {sorted(unknown)}")
        for name in ("num_gpus", "gpus_per_node", "slots_per_gpu"):
            if name not in data:
                raise ValueError(f"{source}: topology field '{name}' is missing")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{source}: bad topology ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def build(
        cls,
        num_gpus: int,
        gpus_per_node: int,
        num_experts: int,
        slots_per_gpu: int | None = None,
        redundant: int | None = None,
        **extra,
    ) -> Topology:
        """From the CLI's `--slots-per-gpu S` or `--redundant R` (exactly one of them)."""
        if (slots_per_gpu is None) == (redundant is None):
            raise ValueError("give exactly one of --slots-per-gpu and --redundant")
        if redundant is not None:
            if redundant < 0:
                raise ValueError(f"--redundant must be >= 0, got {redundant}")
            total = num_experts + redundant
            if total % num_gpus:
                raise ValueError(
                    f"{num_experts} experts + {redundant} redundant = {total} slots do not divide over {num_gpus} GPUs"
                )
            slots_per_gpu = total // num_gpus
        topo = cls(num_gpus=num_gpus, gpus_per_node=gpus_per_node, slots_per_gpu=slots_per_gpu, **extra)
        if topo.num_slots < num_experts:
            raise ValueError(
                f"{topo.num_slots} slots ({num_gpus} GPUs x {slots_per_gpu}) are fewer than the "
                f"{num_experts} experts: every expert needs at least one slot"
            )
        return topo
