"""Memory planning: what weights, gradients and AdamW state take per device under ZeRO 0-3.

The arithmetic follows the ZeRO paper (Rajbhandari et al., 2020), with BLIP-2's twist that frozen
towers are neither trained nor partitioned: every device holds them whole, in the compute dtype.

Per device, with trainable parameters T, frozen F, N devices, b bytes per weight in the compute dtype:

- weights:   F*b + T*b           (ZeRO-3 partitions the trainable part: T*b/N)
- gradients: T*b                 (ZeRO-2/3: T*b/N)
- optimizer: T*(4+4) fp32 moments, plus a 4-byte fp32 master copy when b < 4 (ZeRO-1/2/3: /N)

Activations are not counted; they depend on batch size, sequence length and checkpointing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blip2kit.core.model import Blip2, count_parameters

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2}
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class MemoryRow:
    dtype: str
    zero_stage: int
    devices: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes

    def as_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Plan:
    name: str
    stage: int
    total_params: int
    trainable_params: int
    parts: dict[str, dict[str, int]]
    memory: list[MemoryRow]

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "stage": self.stage,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "parts": self.parts,
            "memory": [row.as_dict() for row in self.memory],
        }


def memory_per_device(
    trainable: int, frozen: int, *, dtype: str, zero_stage: int, devices: int
) -> MemoryRow:
    if dtype not in BYTES_PER_ELEMENT:
        raise ValueError(f"dtype {dtype!r} is not planned for; use one of {sorted(BYTES_PER_ELEMENT)}")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    width = BYTES_PER_ELEMENT[dtype]
    optimizer_per_param = 8 + (4 if width < 4 else 0)

    def shard(nbytes: int, partitioned: bool) -> int:
        return -(-nbytes // devices) if partitioned else nbytes  # ceil division

    return MemoryRow(
        dtype=dtype,
        zero_stage=zero_stage,
        devices=devices,
        weights_bytes=frozen * width + shard(trainable * width, zero_stage >= 3),
        gradients_bytes=shard(trainable * width, zero_stage >= 2),
        optimizer_bytes=shard(trainable * optimizer_per_param, zero_stage >= 1),
    )


def plan_model(model: Blip2, *, devices: int = 1) -> Plan:
    """Parameter counts and the memory table of ``model`` (build it on the meta device)."""
    counts = count_parameters(model)
    parts = {
        part: {"total": count.total, "trainable": count.trainable}
        for part, count in model.parameter_summary().items()
        if part != "total"
    }
    memory = [
        memory_per_device(
            counts.trainable, counts.frozen, dtype=dtype, zero_stage=stage, devices=devices
        )
        for dtype in BYTES_PER_ELEMENT
        for stage in ZERO_STAGES
    ]
    return Plan(
        name=model.name,
        stage=model.stage,
        total_params=counts.total,
        trainable_params=counts.trainable,
        parts=parts,
        memory=memory,
    )


def plan(name: str, *, devices: int = 1) -> Plan:
    """Build ``name`` on the meta device and plan it."""
    from blip2kit.core.build import build_model

    return plan_model(build_model(name, device="meta"), devices=devices)
