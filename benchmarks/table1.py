"""The paper's Table 1 layout from the protocol runner's tables (issue 36).

Each ``--table COUNT:PATH`` is a ``table.json`` written by ``benchmarks/protocol.py`` for one labeled count;
its runs are grouped by variant, and Dice and HD95 (mm) per class and their mean are given as mean +- std over
the seeds (population std, as the runner's), and, where every run of a cell has it (``lcc_metrics``, the
runner's evaluation with the largest 3D piece of each class kept), that mean Dice and mean HD95. A variant found
in several tables of the same count is taken from the last one given (pass the newest measurement last);
``--rename old=new`` shows a variant under another name,
``--only`` keeps the listed variants (in that order). ``--paper`` is a JSON file ``{count: {variant: mean Dice}}``
with the paper's numbers to print beside ours (missing: blank); ``--missing COUNT:VARIANT=reason`` adds a row
that says why a cell is not measured; ``--version COUNT:VARIANT=TEXT`` fills the cell's "version" column (the
bundle version that trained it: a table may hold cells of several versions). ``--registration COUNT:CSV`` adds
the row ``registration_only``: the registration-only baseline of that count's registration folder
(``baseline/brs/metrics_summary.csv``: the BRS partner's label warped onto each validation volume, no training),
one deterministic number per cell, so no std and no seeds::

    python benchmarks/table1.py --table 1:benchmarks/results/acdc_1labeled_table1_cps.json \\
        3:benchmarks/results/acdc_3labeled_table1.json --paper benchmarks/results/paper_table1.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from protocol import read_summary

CLASSES = ("RV", "myocardium", "LV", "mean")


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def collect(tables: list[tuple[int, Path]], rename: dict[str, str]) -> dict[int, dict[str, dict]]:
    """``{count: {variant: {"runs": [...], "source": file name}}}``, later tables replacing earlier ones."""
    cells: dict[int, dict[str, dict]] = defaultdict(dict)
    for count, path in tables:
        table = json.loads(Path(path).read_text())
        grouped: dict[str, list] = defaultdict(list)
        for run in table["runs"]:
            grouped[rename.get(run["variant"], run["variant"])].append(run)
        for variant, runs in grouped.items():
            cells[count][variant] = {"runs": runs, "source": Path(path).name, "preset": table.get("preset")}
    return cells


REGISTRATION_ONLY = "registration_only"


def registration_cell(path: Path) -> dict:
    """The registration-only baseline's ``metrics_summary.csv`` as a cell of one run without a seed."""
    summary = read_summary(path)  # the protocol runner's reader of the same file
    absent = [c for c in CLASSES if c not in summary]
    if absent:
        raise SystemExit(f"--registration: {path} has no row for {', '.join(absent)}")
    metrics = {c: summary[c] for c in CLASSES}
    return {"runs": [{"seed": None, "metrics": metrics}], "source": path.name, "deterministic": True}


def row(variant: str, cell: dict, paper: float | None, version: str = "") -> str:
    paper_cell = "" if paper is None else f"{paper:.1f}"
    if cell.get("deterministic"):  # one number per cell: no seeds, no std
        m = cell["runs"][0]["metrics"]
        dice = " | ".join(f"{100 * m[c]['dice']:.1f}" for c in CLASSES[:3]) + f" | **{100 * m['mean']['dice']:.1f}**"
        hds = " | ".join(f"{m[c]['hd95_mm']:.1f}" for c in CLASSES)
        return f"| `{variant}` | {dice} | {hds} |  | no training | {version} | {paper_cell} | {cell['source']} |"
    runs = sorted(cell["runs"], key=lambda r: r["seed"])
    dice = {c: _stats([100 * r["metrics"][c]["dice"] for r in runs]) for c in CLASSES}
    hd = {c: _stats([r["metrics"][c]["hd95_mm"] for r in runs]) for c in CLASSES}
    seeds = ", ".join(str(r["seed"]) for r in runs)
    fmt = " | ".join(f"{m:.1f} +- {s:.1f}" for m, s in (dice[c] for c in CLASSES[:3]))
    mean = f"**{dice['mean'][0]:.1f} +- {dice['mean'][1]:.1f}**"
    hds = " | ".join(f"{hd[c][0]:.1f}" for c in CLASSES[:3]) + f" | {hd['mean'][0]:.1f} +- {hd['mean'][1]:.1f}"
    lcc = ""  # the same checkpoints with the largest piece of each class kept (inference's default since 0.9.0)
    if all("lcc_metrics" in r for r in runs):
        lcc_dice = _stats([100 * r["lcc_metrics"]["mean"]["dice"] for r in runs])
        lcc_hd = _stats([r["lcc_metrics"]["mean"]["hd95_mm"] for r in runs])
        lcc = f"{lcc_dice[0]:.1f} +- {lcc_dice[1]:.1f} / {lcc_hd[0]:.1f}"
    return f"| `{variant}` | {fmt} | {mean} | {hds} | {lcc} | {seeds} | {version} | {paper_cell} | {cell['source']} |"


def render(
    cells,
    paper: dict,
    only: list[str] | None,
    missing: dict[tuple[int, str], str],
    versions: dict[tuple[int, str], str] | None = None,
) -> str:
    versions = versions or {}
    head = (
        "| method | RV Dice | myocardium Dice | LV Dice | **mean Dice** | RV HD95 | myocardium HD95 | LV HD95 | "
        "mean HD95 (mm) | largest component: mean Dice / HD95 | seeds | version | paper (mean Dice) | from |\n"
        + "|---|"
        + "---:|" * 9
        + "---|---|---:|---|"
    )
    out = []
    for count in sorted(set(cells) | {c for c, _ in missing}):
        names = list(only) if only else sorted(cells.get(count, {}))
        names += [v for c, v in missing if c == count and v not in names]
        lines = [f"**{count} labeled patient{'s' if count != 1 else ''}**", "", head]
        for name in names:
            cell = cells.get(count, {}).get(name)
            ref = paper.get(str(count), {}).get(name)
            if cell is not None:
                lines.append(row(name, cell, ref, versions.get((count, name), "")))
            else:
                reason = missing.get((count, name), "not measured")
                ref_cell = "" if ref is None else f"{ref:.1f}"
                lines.append("| " + " | ".join([f"`{name}`", reason] + [""] * 10 + [ref_cell, ""]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _pair(text: str, what: str) -> tuple[str, str]:
    if ":" not in text:
        raise SystemExit(f"{what}: {text!r} is not COUNT:...")
    count, rest = text.split(":", 1)
    if not count.isdigit():
        raise SystemExit(f"{what}: {count!r} is not a labeled count")
    return count, rest


def _cell_texts(texts: list[str], what: str) -> dict[tuple[int, str], str]:
    """``COUNT:VARIANT=TEXT`` arguments as ``{(count, variant): text}``."""
    cells = {}
    for text in texts:
        count, rest = _pair(text, what)
        variant, _, value = rest.partition("=")
        cells[(int(count), variant)] = value
    return cells


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", nargs="+", required=True, help="COUNT:path/to/table.json (later ones win)")
    ap.add_argument("--rename", nargs="*", default=[], help="old=new variant names")
    ap.add_argument("--only", nargs="*", default=None, help="these variants, in this order")
    ap.add_argument("--paper", default=None, help="JSON {count: {variant: the paper's mean Dice}}")
    ap.add_argument("--missing", nargs="*", default=[], help="COUNT:VARIANT=reason rows for unmeasured cells")
    ap.add_argument("--version", nargs="*", default=[], help="COUNT:VARIANT=the bundle version that trained it")
    ap.add_argument(
        "--registration",
        nargs="*",
        default=[],
        help="COUNT:path/to/metrics_summary.csv of the registration-only baseline",
    )
    ap.add_argument("--out", default=None, help="write the markdown here (default: print)")
    args = ap.parse_args(argv)
    tables = []
    for text in args.table:
        count, path = _pair(text, "--table")
        if not Path(path).is_file():
            raise SystemExit(f"--table: {path} does not exist")
        tables.append((int(count), Path(path)))
    rename = dict(r.split("=", 1) for r in args.rename)
    missing = {cell: reason or "not measured" for cell, reason in _cell_texts(args.missing, "--missing").items()}
    versions = _cell_texts(args.version, "--version")
    paper = json.loads(Path(args.paper).read_text()) if args.paper else {}
    cells = collect(tables, rename)
    for spec in args.registration:
        count, path = _pair(spec, "--registration")
        if not Path(path).is_file():
            raise SystemExit(f"--registration: {path} does not exist")
        cells[int(count)][REGISTRATION_ONLY] = registration_cell(Path(path))
    text = render(cells, paper, args.only, missing, versions)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
