"""Stage kinds, one module each; `register_builtin_stages` fills the stage registry."""

from __future__ import annotations

from compressor.registry import Registry, StageEntry


def register_builtin_stages(registry: Registry[StageEntry]) -> None:
    from compressor.stages.distill import DistillConfig, DistillStage
    from compressor.stages.quantize import QuantizeConfig, QuantizeStage

    registry.register("quantize", StageEntry(QuantizeConfig, QuantizeStage()))
    registry.register("distill", StageEntry(DistillConfig, DistillStage()))
    from compressor.stages.prune import PruneConfig, PruneStage

    registry.register("prune", StageEntry(PruneConfig, PruneStage()))
    from compressor.stages.merge import MergeConfig, MergeStage

    registry.register("merge", StageEntry(MergeConfig, MergeStage()))
    from compressor.stages.lowrank import LowRankConfig, LowRankStage

    registry.register("lowrank", StageEntry(LowRankConfig, LowRankStage()))
