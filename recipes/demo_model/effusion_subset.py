"""Write a prepared-dataset view: every case whose report asks for a pleural effusion, and as
many cases without one.

    python recipes/demo_model/effusion_subset.py DATA OUT [MAX_CASES]

The text fine-tuning of the demonstration model (`stage1_finetune.json`, recipe step
`finetune`) trains on it, so that half of its samples carry an effusion on one side or the
other instead of a quarter. OUT/cases links to DATA/cases; OUT/dataset.json is DATA's index
with the chosen case ids. The reports are read with the evaluation's own report parser.
MAX_CASES caps the view (half of it with an effusion), e.g. to fit a transfer limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from MedSynLib.configuration import write_json
from MedSynLib.data import INDEX, PreparedDataset, read_case_meta
from MedSynLib.errors import MedSynError, run_command
from MedSynLib.evaluation.findings import asks_for


def effusion_subset(data: Path, out: Path, max_cases: int | None = None) -> dict[str, int]:
    dataset = PreparedDataset(data)
    with_effusion, without = [], []
    for case_id in dataset.case_ids:
        asked = asks_for(read_case_meta(dataset.case_path(case_id))["report"], "effusion")
        (with_effusion if asked else without).append(case_id)
    if max_cases is not None:
        with_effusion = with_effusion[: max_cases // 2]
    if not with_effusion:
        raise MedSynError(f"no case of {data} (within the cap) has a report asking for an effusion")
    chosen = set(with_effusion + without[: len(with_effusion)])
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cases").exists():
        (out / "cases").symlink_to((data / "cases").resolve())
    write_json(out / INDEX, {**dataset.index, "cases": [c for c in dataset.case_ids if c in chosen]})
    return {"with_effusion": len(with_effusion), "without": len(chosen) - len(with_effusion)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise MedSynError("usage: effusion_subset.py DATA OUT [MAX_CASES]")
    counts = effusion_subset(Path(args[0]), Path(args[1]), int(args[2]) if len(args) > 2 else None)
    print(f"{args[1]}: {counts['with_effusion']} cases with an effusion, {counts['without']} without")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
