"""Anatomy metrics: structure volumes, airway topology, and consistency of generated anatomy.

- `structure_volumes`: mm^3 of each lobe, lung, the airway and the vessels (Table 1 of the
  paper reports the airway volume, mean +- sd over a set, in units of 10^4 mm^3).
- `airway_topology`: connected components (26-connectivity) and a branch count of the
  largest component. scikit-image is not a dependency, so the branch count is not taken from
  a skeleton but from *geodesic shells*: the geodesic distance from the top of the airway
  (the trachea) inside the mask is cut into shells of ``shell_mm`` (default 3 mm, at least
  1.5 voxels); the connected pieces of consecutive shells form a tree, each piece linked to
  the pieces of the previous shell it touches. A piece with k >= 2 children is a
  bifurcation and starts k branches; children whose subtree is shorter than
  ``min_branch_shells`` shells are spurs and do not count. ``branches`` = 1 (trachea) +
  the branches started at bifurcations; ``endpoints`` = leaves of the pruned tree. The count
  follows the tree's topology (a Y gives 3), not a radiologist's bronchial generations.
- `anatomy_consistency`: Dice between the masks a model generated with a CT and the masks a
  segmenter finds in that CT: lungs (union of lobes when the model has lobes), airway, vessels.
  Lungs are compared as *envelopes*: each axial slice of a lung mask has its holes filled, so
  vessel and bronchus voxels that a label map gives to the vessel/airway labels count as lung,
  as they do in a segmenter's lung masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from MedSynLib.anatomy import LOBES
from MedSynLib.compat import zip_strict

if TYPE_CHECKING:
    import SimpleITK as sitk

VOLUME_STRUCTURES = LOBES + ("left_lung", "right_lung", "airway", "vessels")
CONSISTENCY_STRUCTURES = ("left_lung", "right_lung", "airway", "vessels")
_FULL = np.ones((3, 3, 3), dtype=bool)


def structure_volumes(masks: dict[str, np.ndarray], spacing: tuple[float, float, float]) -> dict[str, float]:
    """Volume in mm^3 of each structure present (lobes, lungs, airway, vessels) and of both lungs."""
    voxel = float(np.prod(spacing))
    volumes = {name: float(masks[name].sum()) * voxel for name in VOLUME_STRUCTURES if name in masks}
    if "left_lung" in volumes and "right_lung" in volumes:
        volumes["lungs"] = volumes["left_lung"] + volumes["right_lung"]
    return volumes


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def lung_envelope(mask: np.ndarray) -> np.ndarray:
    """The mask with the holes of each axial slice filled."""
    out = np.zeros_like(mask, dtype=bool)
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


# --------------------------------------------------------------------------------------
# Airway topology
# --------------------------------------------------------------------------------------


def _voxel_graph(mask: np.ndarray, spacing_zyx: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """26-neighbour graph of the mask's voxels, edges weighted by their length in mm."""
    coords = np.argwhere(mask)
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[tuple(coords.T)] = np.arange(len(coords))
    rows, cols, weights = [], [], []
    padded = np.pad(index, 1, constant_values=-1)
    for offset in np.argwhere(_FULL) - 1:
        if tuple(offset) <= (0, 0, 0):  # each undirected edge once
            continue
        neighbour = padded[tuple(coords[:, a] + 1 + offset[a] for a in range(3))]
        keep = neighbour >= 0
        rows.append(np.nonzero(keep)[0])
        cols.append(neighbour[keep])
        weights.append(np.full(int(keep.sum()), float(np.linalg.norm(offset * spacing_zyx))))
    rows, cols, weights = (np.concatenate(x) if x else np.zeros(0) for x in (rows, cols, weights))
    n = len(coords)
    graph = sparse.coo_matrix((weights, (rows.astype(np.int64), cols.astype(np.int64))), shape=(n, n)).tocsr()
    return graph + graph.T, coords


def airway_topology(
    airway: np.ndarray, spacing: tuple[float, float, float], *, shell_mm: float = 3.0, min_branch_shells: int = 2
) -> dict:
    """Components, and branches / bifurcations / endpoints of the largest component (see module doc)."""
    airway = np.asarray(airway, dtype=bool)
    labels, count = ndimage.label(airway, structure=_FULL)
    result = {"components": int(count), "branches": 0, "bifurcations": 0, "endpoints": 0,
              "largest_component_fraction": 0.0, "method": "geodesic shells"}
    if count == 0:
        return result
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    result["largest_component_fraction"] = float(sizes.max() / sizes.sum())
    spacing_zyx = np.asarray(spacing[::-1], dtype=float)
    graph, coords = _voxel_graph(largest, spacing_zyx)
    # Geodesic distance (mm) from the top slice of the airway (the trachea, z is superior).
    roots = np.nonzero(coords[:, 0] == coords[:, 0].max())[0]
    distance = csgraph.dijkstra(graph, indices=roots, min_only=True)
    width = max(shell_mm, 1.5 * float(spacing_zyx.max()))
    shell = np.floor(distance / width).astype(np.int64)

    # Pieces: connected parts of each shell (edges kept only inside a shell).
    rows, cols = graph.nonzero()
    same = shell[rows] == shell[cols]
    within = sparse.coo_matrix((np.ones(int(same.sum())), (rows[same], cols[same])), shape=graph.shape)
    _, piece = csgraph.connected_components(within, directed=False)
    # Links between pieces of consecutive shells.
    step = shell[cols] == shell[rows] + 1
    links = set(zip_strict(piece[rows[step]].tolist(), piece[cols[step]].tolist()))
    children: dict[int, list[int]] = {}
    has_parent = set()
    for parent, child in sorted(links):
        if child in has_parent:
            continue  # a piece touching two parents (a loop) keeps the first
        has_parent.add(child)
        children.setdefault(parent, []).append(child)
    root_pieces = sorted({int(piece[r]) for r in roots})

    # Depth (in shells) of each subtree, to prune spurs; iterative post-order.
    depth: dict[int, int] = {}
    order, stack = [], list(root_pieces)
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(children.get(node, []))
    for node in reversed(order):
        depth[node] = 1 + max((depth[c] for c in children.get(node, [])), default=0)
    # Walk the pruned tree from the trachea: spurs (short subtrees) are left out.
    branches, bifurcations, endpoints = len(root_pieces), 0, 0
    stack = list(root_pieces)
    while stack:
        node = stack.pop()
        kept = [c for c in children.get(node, []) if depth[c] >= min_branch_shells]
        if len(kept) >= 2:
            bifurcations += 1
            branches += len(kept)
        endpoints += not kept
        stack.extend(kept)
    result.update(branches=int(branches), bifurcations=int(bifurcations), endpoints=int(endpoints),
                  shell_mm=float(width))
    return result


# --------------------------------------------------------------------------------------
# Consistency between generated anatomy and the anatomy found in the generated CT
# --------------------------------------------------------------------------------------


def anatomy_consistency(
    image: sitk.Image, masks: dict[str, np.ndarray], segmenter: Callable[[sitk.Image], object],
    *, found: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Dice per structure between generated `masks` and what `segmenter` finds in the CT `image`.

    `found` may pass the segmenter's masks when they were already computed.
    """
    if found is None:
        found = segmenter(image).masks
    scores = {}
    for name in CONSISTENCY_STRUCTURES:
        if name not in masks or name not in found:
            continue
        if name.endswith("_lung"):
            scores[name] = dice(lung_envelope(masks[name]), lung_envelope(found[name]))
        else:
            scores[name] = dice(masks[name], found[name])
    return scores
