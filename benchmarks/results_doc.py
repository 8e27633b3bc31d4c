"""Write the bench section of docs/results.md from the results.md files `cbpt-guard bench` wrote.

    python benchmarks/results_doc.py            # docs/bench/*/results.md -> docs/results.md

Everything between the `bench:begin` and `bench:end` markers is replaced; nothing is typed by
hand there. Each bench's headings move down two levels under its own heading.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BEGIN, END = "<!-- bench:begin (written by benchmarks/results_doc.py) -->", "<!-- bench:end -->"
# Which bench run each folder holds, and the command that made it.
RUNS = {
    "shapes": (
        "Shapes: every defense, 3 shot sets, and the shots sweep",
        "cbpt-guard bench --work bench-out/shapes --dataset shapes --seed 0 --seed 1 --seed 2 --sweep-seed 0 "
        "--sweep-shots 1 --sweep-shots 2 --sweep-shots 4 --sweep-shots 16",
    ),
    "digits-cbpt": (
        "Digits: CBPT, 3 shot sets",
        "cbpt-guard bench --work bench-out/digits-cbpt --dataset digits --method none --method cbpt --sweep-shots 16",
    ),
    "digits": (
        "Digits: every defense, one shot set",
        "cbpt-guard bench --work bench-out/digits --dataset digits --seed 0 --sweep-shots 16",
    ),
}


def bench_section(bench: Path, doc_dir: Path) -> str:
    parts = [BEGIN]
    for folder, (title, command) in RUNS.items():
        src = bench / folder / "results.md"
        if not src.is_file():
            continue
        body = src.read_text().split("\n", 1)[1]  # the bench's own title goes
        body = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", body, flags=re.M)
        pngs = sorted((bench / folder).glob("*.png"))
        pictures = "\n".join(f"![{p.stem}]({p.relative_to(doc_dir).as_posix()})" for p in pngs)
        parts += [f"### {title}", "", f"```bash\n{command}\n```", body.strip(), "", pictures, ""]
    return "\n".join(parts + [END])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--bench", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    text = args.doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    args.doc.write_text(text[:start] + bench_section(args.bench, args.doc.parent) + text[end:])
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
