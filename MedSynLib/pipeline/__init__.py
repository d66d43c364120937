"""Generation: `model_folder` (what a model is on disk, its stages), `channels` (CT + anatomy as
model channels), `sampling` (one stage's sampler run, guidance, tiling), `generation`
(`MedSynPipeline`: report -> CT + anatomy), `presets` (network sizes), `convert` (the
reference's checkpoints)."""

from MedSynLib.pipeline.generation import GenerationResult, MedSynPipeline
from MedSynLib.pipeline.model_folder import EMBEDDED_MODEL, ModelConfig, Stage, StageConfig

__all__ = ["EMBEDDED_MODEL", "GenerationResult", "MedSynPipeline", "ModelConfig", "Stage", "StageConfig"]
