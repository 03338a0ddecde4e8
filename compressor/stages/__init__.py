"""Stage kinds, one module each; `register_builtin_stages` fills the stage registry."""

from __future__ import annotations

from compressor.registry import Registry, StageEntry


def register_builtin_stages(registry: Registry[StageEntry]) -> None:
    from compressor.stages.quantize import QuantizeConfig, QuantizeStage

    registry.register("quantize", StageEntry(QuantizeConfig, QuantizeStage()))
    from compressor.stages.lowrank import LowRankConfig, LowRankStage

    registry.register("lowrank", StageEntry(LowRankConfig, LowRankStage()))
