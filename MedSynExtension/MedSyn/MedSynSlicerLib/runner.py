"""A whole generation, from request to MRML nodes, without Qt.

The module's Logic runs these steps asynchronously (a QTimer polls the job); the console
`MedSynLogic().generate(...)` and the headless tests run them in one call,
`run_generation`. Nodes are created only after the process succeeded, in one
all-or-nothing import, so a failed or cancelled generation leaves the scene as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import mrml
from .job import GenerationJob, GenerationRequest, JobEvent, Launcher, check_model_dir


class GenerationFailed(RuntimeError):
    """The generator process failed or was cancelled; the message is meant for the user."""


def prepare_job(
    request: GenerationRequest,
    *,
    conditioning_segmentation=None,
    reference=None,
    launcher: Launcher | None = None,
    python_executable: str | None = None,
) -> GenerationJob:
    """A job ready to start; a conditioning segmentation is written as the .seg.nrrd for --anatomy.

    `reference` (a volume node or Geometry) sets the grid of that file and hence of the
    results; by default it is the segmentation's own reference geometry.
    """
    check_model_dir(request.model_dir)
    work_dir = Path(tempfile.mkdtemp(prefix="MedSyn-"))
    try:
        anatomy_file = None
        if conditioning_segmentation is not None:
            export = mrml.anatomy_from_segmentation_node(conditioning_segmentation, reference)
            anatomy_file = export.write(work_dir / "anatomy-input.seg.nrrd")
        return GenerationJob(
            request,
            python_executable=python_executable,
            launcher=launcher,
            work_dir=work_dir,
            anatomy_file=anatomy_file,
        )
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def import_result(scene, job: GenerationJob, *, show_3d: bool = True) -> mrml.GenerationNodes:
    """The finished job's result as nodes in `scene`; GenerationFailed if there is none."""
    if not job.finished:
        raise RuntimeError("the job has not finished yet")
    if not job.succeeded:
        raise GenerationFailed(job.failure_message())
    return mrml.load_generation_result(scene, job.output_dir, show_3d=show_3d, parameters=job.request.parameters())


def run_generation(
    scene,
    request: GenerationRequest,
    *,
    conditioning_segmentation=None,
    reference=None,
    launcher: Launcher | None = None,
    python_executable: str | None = None,
    on_event: Callable[[JobEvent], None] | None = None,
    idle: Callable[[], None] | None = None,
    show_3d: bool = True,
) -> mrml.GenerationNodes:
    """Run one generation to the end and import it (blocking; `idle` runs while waiting)."""
    job = prepare_job(
        request,
        conditioning_segmentation=conditioning_segmentation,
        reference=reference,
        launcher=launcher,
        python_executable=python_executable,
    )
    try:
        job.start()
        try:
            job.wait(on_event=on_event, idle=idle)
        except BaseException:  # e.g. KeyboardInterrupt in the console: do not leave the process running
            job.cancel()
            raise
        return import_result(scene, job, show_3d=show_3d)
    finally:
        job.cleanup()
