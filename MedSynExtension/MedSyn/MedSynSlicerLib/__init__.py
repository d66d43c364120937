"""Qt-free parts of the MedSyn Slicer module.

- `job`: the generation request, the command line, the JSON progress protocol and the
  background process (pure Python: no Slicer, no Qt).
- `mrml`: building and reading MRML nodes (volume, segmentation, subject hierarchy) with
  `slicer`/`vtk` only, so it runs in 3D Slicer and in a headless `slicer-core` scene alike.
- `runner`: a whole generation, from request to nodes, used by the module's Logic.

They live in a package, not as loose files beside MedSyn.py, because Slicer tries to load
every top-level .py file of a module folder as a module of its own.
"""
