"""Reads the Autobahn TestSuite's report (index.json), writes the counts of
each behaviour per agent as a Markdown table, and exits non-zero when any
case is FAILED, NON-STRICT or UNIMPLEMENTED (by its behaviour or its close
behaviour). INFORMATIONAL and OK pass."""

import json
import sys
from collections import Counter

BAD = {"FAILED", "NON-STRICT", "UNIMPLEMENTED"}
ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def case_key(case):
    return [int(p) for p in case.split(".")]


def main(index, out):
    with open(index) as f:
        report = json.load(f)
    lines = [
        "| agent | cases | " + " | ".join(ORDER) + " |",
        "|---|---:|" + "---:|" * len(ORDER),
    ]
    bad = []
    for agent in sorted(report):
        cases = report[agent]
        counts = Counter(c["behavior"] for c in cases.values())
        lines.append(
            f"| {agent} | {len(cases)} | "
            + " | ".join(str(counts.get(b, 0)) for b in ORDER)
            + " |"
        )
        for case in sorted(cases, key=case_key):
            c = cases[case]
            if c["behavior"] in BAD or c.get("behaviorClose") in BAD:
                bad.append(f"{agent} {case}: {c['behavior']} (close: {c.get('behaviorClose')})")
    table = "\n".join(lines) + "\n"
    with open(out, "w") as f:
        f.write(table)
    print(table)
    if bad:
        print(f"{len(bad)} case(s) not passing:")
        for b in bad:
            print("  " + b)
        return 1
    print("every case OK or INFORMATIONAL")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
