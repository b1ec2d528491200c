"""Where a kernel's warps wait, from Nsight Compute's source view: stall samples by reason, by SASS opcode, and the
instructions with the most samples.

    ncu --set full -k regex:KERNEL --launch-count 1 -o REPORT python3 ...      (on the GPU: gpu_bench.sh state_ncu)
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > SOURCE.csv
    python3 benchmarks/ncu_stalls.py SOURCE.csv [--top 30] [--out SUMMARY.json]

Every sample is a warp seen at one instruction; its reason says why that warp did not issue (``selected``: it did).
Reading the top instructions against the SASS tells which dependency a stall waits on (``short_sb``: a shared-memory,
shuffle or other MIO result; ``long_sb``: global memory; ``wait``: a fixed-latency dependency; ``barrier``: a
``__syncthreads``).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _opcode(sass: str) -> str:
    """The opcode of a SASS line, its guard predicate (``@!P0``) dropped: ``HGMMA.64x64x16.F32.BF16``."""
    tokens = sass.split()
    if tokens and tokens[0].startswith("@"):
        tokens = tokens[1:]
    return tokens[0] if tokens else "?"


def summarize(path: Path, top: int) -> dict:
    """Samples by reason, by opcode, and the ``top`` instructions (address, SASS, samples, three main reasons)."""
    rows = list(csv.reader(path.open()))
    start = next(i for i, row in enumerate(rows) if row and row[0] == "Address")
    header, body = rows[start], rows[start + 1 :]
    column = {name: i for i, name in enumerate(header)}
    reasons = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    total = sum(_number(row[column[SAMPLES]]) for row in body) or 1.0
    by_reason: Counter[str] = Counter()
    by_opcode: Counter[str] = Counter()
    for row in body:
        samples = _number(row[column[SAMPLES]])
        by_opcode[_opcode(row[column["Source"]])] += samples
        for reason in reasons:
            by_reason[reason.removeprefix("stall_")] += _number(row[column[reason]])
    ranked = sorted(body, key=lambda row: -_number(row[column[SAMPLES]]))[:top]

    def main_reasons(row: list[str]) -> list[str]:
        return [r.removeprefix("stall_") for r in sorted(reasons, key=lambda r: -_number(row[column[r]]))[:3]]

    return {
        "source": str(path),
        "samples": total,
        "by_reason": {k: round(v / total, 4) for k, v in by_reason.most_common()},
        "by_opcode": {k: round(v / total, 4) for k, v in by_opcode.most_common(15)},
        "top": [
            {
                "address": row[column["Address"]],
                "sass": row[column["Source"]].strip(),
                "share": round(_number(row[column[SAMPLES]]) / total, 4),
                "reasons": main_reasons(row),
            }
            for row in ranked
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    summary = summarize(args.source, args.top)
    text = json.dumps(summary, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(f"{summary['samples']:.0f} samples")
    for reason, share in list(summary["by_reason"].items())[:8]:
        print(f"  {reason:18s} {share:6.1%}")
    for entry in summary["top"][:12]:
        print(f"  {entry['share']:6.1%}  {entry['sass'][:70]:70s} {', '.join(entry['reasons'])}")


if __name__ == "__main__":
    main()
