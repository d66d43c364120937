"""MedSyn: text-guided, anatomy-aware synthesis of 3D chest CT.

    from MedSynLib import MedSynPipeline
    pipeline = MedSynPipeline.from_pretrained("models/mine")
    result = pipeline.generate("Small left pleural effusion.", seed=1)
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing the pipeline loads torch; keep `import MedSynLib` itself light.
    if name in ("MedSynPipeline", "GenerationResult"):
        from MedSynLib.pipeline import generation as pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'MedSynLib' has no attribute {name!r}")
