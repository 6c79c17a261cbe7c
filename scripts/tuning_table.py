"""Print the tuning sweeps of scripts/tuning.sh as Markdown: mean JCT (s) per QPS."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str = "docs/results/tuning") -> None:
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        sys.exit(f"no results in {folder}: run scripts/tuning.sh first")
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.stem.split("-")[0], []).append(f)
    for group, members in groups.items():
        rows = {f.stem: json.loads(f.read_text())["rows"] for f in members}
        qps = sorted({r["qps"] for rs in rows.values() for r in rs})
        print(f"\n**{group}** (mean JCT in seconds, averaged over the seeds)\n")
        print("| setting | " + " | ".join(f"QPS {q:g}" for q in qps) + " |")
        print("|---|" + "---|" * len(qps))
        for name, rs in rows.items():
            by_qps = {r["qps"]: r["mean_jct_s"] for r in rs}
            cells = [f"{by_qps[q]:.1f}" if q in by_qps else "–" for q in qps]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
