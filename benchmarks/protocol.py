"""The protocol runner: variants x seeds on one datalist at a fixed budget, one table, resumable.

For every (variant, seed) it trains with the bundle's own command into ``OUT/<variant>_s<seed>/``
(``models/``, ``eval/``, ``train.log``), evaluates that run's best checkpoint on the datalist's
``--section`` (default ``validation``) with ``run evaluating``, and records the per-class and mean
Dice (and HD95, ours and SSL4MIS's) in ``OUT/<variant>_s<seed>/result.json`` (written atomically,
last). A run with a ``result.json`` is not run again; a run killed during training resumes from its
``train_state.pt`` (``--resume true``). After every run ``OUT/table.md`` and ``OUT/table.json`` are
rewritten: per variant, mean +- std (population, over seeds) of each class and of the mean, and every
run. **Validation also selects the checkpoint** (the bundle saves the best validation model), so the
numbers are validation numbers, not held-out test numbers; the table says so.

Variants are ``name=overlay[,overlay...]`` (overlays relative to ``configs/``; ``name=`` alone is
``configs/train.yaml``, i.e. CCT-R); ``--variant_set name:key=value`` adds an override to one
variant (a config switch screened without a new overlay). Presets (``--preset``):

* ``screen``: patch 128, batch 8, 600 iterations, validation every 200;
* ``full``: patch 128, batch 8, 1,200 iterations, validation every 300 (the CPU budget of the results).

Every evaluation scores the raw argmax (``--largest_component false``: comparable with the runs of bundles
before 0.9.0), and each model once more with the largest 3D connected piece of each class kept, as inference
does by default since 0.9.0 (``--largest_component true``; ``--no_largest_component`` skips it), in a table of
its own. Two-network models are also evaluated with each network alone (``--branch a`` / ``b``), in another,
and every model trained with mirror flips once more with mirror test-time augmentation (``--flip_tta true``;
``--no_flip_tta`` skips it), in a third; finished runs without such a number get it on the next call.

Example (2 seeds, two runs side by side with one thread each)::

    python benchmarks/protocol.py --datalist /tmp/acdc/acdc_1.json --dataset dataset_acdc.yaml \\
        --variants "cct-r=" "cts=variant_cts.yaml" --seeds 12345 2 --preset full --parallel 2 --out runs/one_labeled

Labeled splits (ACDC): instead of ``--datalist``, ``--acdc_root ROOT --labeled N --label_splits standard 1 2``
builds one datalist per split in ``OUT/datalists/`` (``standard``: the split file's labeled patients;
an integer: N train patients drawn with that seed, ``scripts.data.datalist.build_acdc(labeled_seed=)``)
and runs every variant x seed on each (``OUT/<variant>_<split>_s<seed>/``); a variant's mean +- std
is then over seeds and splits.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.data.atomic_io import write_json, write_text  # noqa: E402

PRESETS = {
    "screen": {"patch_size": "[128,128]", "batch_size": "8", "num_iterations": "600", "val_interval": "200"},
    "full": {"patch_size": "[128,128]", "batch_size": "8", "num_iterations": "1200", "val_interval": "300"},
}


@dataclass
class Run:
    variant: str
    overlays: list[str]
    seed: int
    folder: Path
    overrides: dict[str, str] = field(default_factory=dict)
    datalist: str = ""
    split: str | None = None  # the labeled split's name (None: the one --datalist)

    @property
    def name(self) -> str:
        return f"{self.variant}_s{self.seed}" if self.split is None else f"{self.variant}_{self.split}_s{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name=a.yaml,b.yaml"`` -> ``("name", ["a.yaml", "b.yaml"])``; ``"name="`` -> ``("name", [])``."""
    if "=" not in text:
        raise SystemExit(f"--variants: {text!r} is not name=overlay[,overlay...]")
    name, _, files = text.partition("=")
    overlays = [f.strip() for f in files.split(",") if f.strip()]
    for f in overlays:
        if not (ROOT / "configs" / f).is_file():
            raise SystemExit(f"--variants {name}: overlay configs/{f} does not exist")
    return name.strip(), overlays


def config_list(run: Run, dataset: str | None) -> str:
    files = (
        ["configs/train.yaml"] + ([f"configs/{dataset}"] if dataset else []) + [f"configs/{f}" for f in run.overlays]
    )
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def train_command(run: Run, datalist: str, dataset: str | None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        config_list(run, dataset),
        "--datalist_file",
        datalist,
        "--seed",
        str(run.seed),
        "--ckpt_dir",
        str(run.folder / "models"),
        "--output_dir",
        str(run.folder / "eval" / "training"),
    ]
    if (run.folder / "models" / "train_state.pt").exists():
        cmd += ["--resume", "true"]
    for k, v in run.overrides.items():
        cmd += [f"--{k}", v]
    return cmd


def evaluate_command(
    run: Run,
    datalist: str,
    section: str,
    branch: str | None = None,
    flip_tta: bool = False,
    largest_component: bool = False,
) -> list[str]:
    """Evaluate the run's best checkpoint; ``branch`` ``a`` / ``b``: one network of a two-network model alone;
    ``flip_tta``: the model with mirror test-time augmentation (``configs/inference.yaml`` ``flip_tta``);
    ``largest_component``: the largest 3D piece of each class kept (otherwise the raw argmax, whatever the model's
    own setting)."""
    folder = (
        f"evaluation_{section}"
        + (f"_{branch}" if branch else "")
        + ("_tta" if flip_tta else "")
        + ("_lcc" if largest_component else "")
    )
    return (
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "evaluating",
            "--config_file",
            "['configs/inference.yaml','configs/evaluate.yaml']",
            "--datalist_file",
            datalist,
            "--datalist_section",
            section,
            "--ckpt_dir",
            str(run.folder / "models"),
            "--output_dir",
            str(run.folder / "eval" / folder),
        ]
        + ["--largest_component", "true" if largest_component else "false"]
        + (["--branch", branch] if branch else [])
        + (["--flip_tta", "true"] if flip_tta else [])
    )


def mirror_trained(run: Run) -> bool:
    """Whether the run's model was trained with mirror flips (its model_config.json)."""
    from scripts.training.model_config import trained_with_flips

    model_config = run.folder / "models" / "model_config.json"
    return model_config.exists() and trained_with_flips(json.loads(model_config.read_text()))


def _evaluate_once_more(run: Run, datalist: str, section: str, what: str, **kwargs) -> dict:
    """Evaluate a finished run's model once more (``evaluate_command``'s ``kwargs``); its summary."""
    command = evaluate_command(run, datalist, section, **kwargs)
    with open(run.folder / "train.log", "a") as log:
        if subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{run.name}: evaluation {what} failed, see {run.folder / 'train.log'}")
    return read_summary(Path(command[command.index("--output_dir") + 1]) / "metrics_summary.csv")


def add_tta(run: Run, section: str) -> dict:
    """Evaluate a finished run's model with mirror TTA (once) and record its mean Dice in ``result.json``."""
    result = json.loads(run.result_path.read_text())
    if "tta_dice" in result or not mirror_trained(run):
        return result
    tta = _evaluate_once_more(run, result["datalist"], section, "with flip TTA", flip_tta=True)
    result["tta_dice"] = {c: m["dice"] for c, m in tta.items()}
    write_json(run.result_path, result)
    return result


def add_largest_component(run: Run, section: str) -> dict:
    """Evaluate a finished run's model with the largest piece of each class kept (once); record its metrics
    (Dice and HD95 per class) in ``result.json`` as ``lcc_metrics``."""
    result = json.loads(run.result_path.read_text())
    if "lcc_metrics" in result:
        return result
    result["lcc_metrics"] = _evaluate_once_more(
        run, result["datalist"], section, "with the largest component", largest_component=True
    )
    write_json(run.result_path, result)
    return result


def read_summary(path: Path) -> dict:
    """``metrics_summary.csv`` -> ``{class_name: {metric: mean}}`` (the ``mean`` row included)."""
    out = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            name = "mean" if row["class"] == "mean" else row["class_name"]
            out[name] = {
                k[: -len("_mean")]: float(v) for k, v in row.items() if k.endswith("_mean") and v not in ("", None)
            }
    return out


def two_networks(run: Run) -> bool:
    model_config = run.folder / "models" / "model_config.json"
    return model_config.exists() and set(json.loads(model_config.read_text()).get("networks", {})) == {"a", "b"}


def model_branch(run: Run) -> str:
    """The branch the run's model segments with (its model_config.json; ``mean`` when unset)."""
    model_config = run.folder / "models" / "model_config.json"
    return json.loads(model_config.read_text()).get("branch", "mean") if model_config.exists() else "mean"


def execute(run: Run, dataset: str | None, section: str) -> dict:
    """Train (or resume), evaluate (the model, and each network alone for two-network models), write ``result.json``."""
    run.folder.mkdir(parents=True, exist_ok=True)
    datalist = run.datalist
    start = time.time()
    with open(run.folder / "train.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(train_command(run, datalist, dataset))}\n")
        log.flush()
        if subprocess.run(
            train_command(run, datalist, dataset), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        ).returncode:
            raise RuntimeError(f"{run.name}: training failed, see {run.folder / 'train.log'}")
        # the model as it segments, then each network alone, and the mean of both when validation chose one of them
        chosen = model_branch(run)
        branches = [None]
        if two_networks(run):
            branches += ["a", "b"] + (["mean"] if chosen != "mean" else [])
        for branch in branches:
            if subprocess.run(
                evaluate_command(run, datalist, section, branch), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            ).returncode:
                raise RuntimeError(
                    f"{run.name}: evaluation{' of branch ' + branch if branch else ''} failed, see {run.folder / 'train.log'}"
                )
    summary = read_summary(run.folder / "eval" / f"evaluation_{section}" / "metrics_summary.csv")
    by_branch = {
        b: read_summary(run.folder / "eval" / f"evaluation_{section}_{b}" / "metrics_summary.csv")["mean"]["dice"]
        for b in branches
        if b
    }
    result = {
        "variant": run.variant,
        "seed": run.seed,
        "split": run.split,
        "datalist": datalist,
        "overlays": run.overlays,
        "overrides": run.overrides,
        "section": section,
        "metrics": summary,
        "branch": chosen,
        "branch_dice": by_branch,
        "minutes": (time.time() - start) / 60,
    }
    write_json(run.result_path, result)
    return result


def table(
    results: list[dict],
    runs: list[Run],
    preset: str,
    section: str,
    overrides: dict | None = None,
    per_variant: dict | None = None,
) -> tuple[str, dict]:
    """Markdown and JSON of mean +- std per variant (population std over seeds) and every run."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    classes = [c for c in (results[0]["metrics"] if results else {}) if c != "mean"] + ["mean"]
    order = list(dict.fromkeys(run.variant for run in runs))
    pending = [run.name for run in runs if not run.result_path.exists()]
    lines = [f"# Protocol runs: preset `{preset}` ({PRESETS[preset]}), Dice on `{section}` x 100", ""]
    if overrides is not None:  # what every run was actually given (the preset with --set / --parallel on top)
        lines += [
            "Settings of every run: "
            + ", ".join(f"`{k}={v}`" for k, v in overrides.items())
            + "."
            + (
                ""
                if not per_variant
                else " Per variant: "
                + "; ".join(f"{n}: " + ", ".join(f"`{k}={v}`" for k, v in kv.items()) for n, kv in per_variant.items())
                + "."
            ),
            "",
        ]
    lines += [
        "Validation also selects each run's checkpoint (the best validation model is saved), so these are "
        "validation numbers, not held-out test numbers. Std: population, over seeds.",
        "",
        "| variant | seeds | " + " | ".join(classes) + " |",
        "|---|---|" + "---:|" * len(classes),
    ]
    summary = {}
    for v in order:
        rs = sorted(by_variant.get(v, []), key=lambda r: (str(r.get("split")), r["seed"]))
        if not rs:
            continue
        summary[v] = {}
        cells = [_summarise(summary[v], c, [100 * r["metrics"][c]["dice"] for r in rs]) for c in classes]
        lines.append(f"| {v} | {', '.join(_seed_label(r) for r in rs)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every run:",
        "",
        "| run | " + " | ".join(classes) + " | mean HD95 mm (SSL4MIS rule) | minutes |",
        "|---|" + "---:|" * (len(classes) + 2),
    ]
    for r in sorted(
        results,
        key=lambda r: (order.index(r["variant"]) if r["variant"] in order else 99, str(r.get("split")), r["seed"]),
    ):
        m = r["metrics"]["mean"]
        hd = f"{m.get('hd95_mm', float('nan')):.1f} ({m.get('hd95_mm_ssl4mis', float('nan')):.1f})"
        name = r["variant"] + (f"_{r['split']}" if r.get("split") is not None else "") + f"_s{r['seed']}"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * r['metrics'][c]['dice']:.1f}" for c in classes)
            + f" | {hd} | {r['minutes']:.0f} |"
        )
    tta_rows = [r for r in results if r.get("tta_dice")]
    if tta_rows:
        lines += [
            "",
            "With mirror test-time augmentation (`--flip_tta true` at evaluation: each slice and its three "
            "in-plane mirror images, logits averaged; the same checkpoints):",
            "",
            "| variant | seeds | " + " | ".join(classes) + " |",
            "|---|---|" + "---:|" * len(classes),
        ]
        for v in order:
            rs = sorted((r for r in tta_rows if r["variant"] == v), key=lambda r: (str(r.get("split")), r["seed"]))
            if not rs:
                continue
            into = summary.setdefault(v, {})
            cells = [_summarise(into, f"tta_{c}", [100 * r["tta_dice"][c] for r in rs]) for c in classes]
            lines.append(f"| {v} | {', '.join(_seed_label(r) for r in rs)} | " + " | ".join(cells) + " |")
    lcc_rows = [r for r in results if r.get("lcc_metrics")]
    if lcc_rows:
        lines += [
            "",
            "With the largest 3D connected piece of each class kept (`--largest_component true` at evaluation, "
            "inference's default since 0.9.0; the same checkpoints). Dice, then the mean HD95 in mm:",
            "",
            "| variant | seeds | " + " | ".join(classes) + " | mean HD95 mm |",
            "|---|---|" + "---:|" * (len(classes) + 1),
        ]
        for v in order:
            rs = sorted((r for r in lcc_rows if r["variant"] == v), key=lambda r: (str(r.get("split")), r["seed"]))
            if not rs:
                continue
            into = summary.setdefault(v, {})
            cells = [_summarise(into, f"lcc_{c}", [100 * r["lcc_metrics"][c]["dice"] for r in rs]) for c in classes]
            cells.append(_summarise(into, "lcc_hd95_mm", [r["lcc_metrics"]["mean"]["hd95_mm"] for r in rs]))
            lines.append(f"| {v} | {', '.join(_seed_label(r) for r in rs)} | " + " | ".join(cells) + " |")
    branch_rows = [r for r in results if r.get("branch_dice")]
    if branch_rows:
        lines += [
            "",
            "Each network alone (mean Dice; two-network models: `a` = network A, the CNN; `b` = network B; "
            "ensemble = the mean of both logits; the model = what it segments with, chosen by validation with "
            "`ensemble_branch: best`):",
            "",
            "| run | the model | ensemble | a | b |",
            "|---|---|---:|---:|---:|",
        ]
        for r in branch_rows:
            name = r["variant"] + (f"_{r['split']}" if r.get("split") is not None else "") + f"_s{r['seed']}"
            ensemble = r["branch_dice"].get("mean", r["metrics"]["mean"]["dice"])
            lines.append(
                f"| {name} | {r.get('branch', 'mean')} | {100 * ensemble:.1f} | {100 * r['branch_dice']['a']:.1f} | "
                f"{100 * r['branch_dice']['b']:.1f} |"
            )
    if pending:
        lines += ["", f"Not finished yet: {', '.join(pending)}."]
    return "\n".join(lines) + "\n", {"preset": preset, "section": section, "summary": summary, "runs": results}


def _summarise(into: dict, key: str, values: list[float]) -> str:
    """Record mean, population std and count of ``values`` as ``into[key]``; the ``mean +- std`` table cell."""
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    into[key] = {"mean": mean, "std": std, "n": len(values)}
    return f"{mean:.1f} +- {std:.1f}"


def _seed_label(result: dict) -> str:
    return str(result["seed"]) if result.get("split") is None else f"{result['split']}:{result['seed']}"


def acdc_datalists(root: str, labeled: int, splits: list[str], out: Path) -> dict[str, str]:
    """``{split: datalist path}``: one ACDC datalist per labeled split, built once under ``out``."""
    from scripts.data.datalist import build_acdc

    paths = {}
    for split in splits:
        if split != "standard" and not split.lstrip("-").isdigit():
            raise SystemExit(f"--label_splits: {split!r} is neither 'standard' nor an integer seed")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"acdc_{labeled}_{split}.json"
        if not path.exists():
            build_acdc(root, path, labeled=labeled, labeled_seed=None if split == "standard" else int(split))
        paths[split] = str(path.resolve())
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", help="the datalist of every run (or --acdc_root)")
    ap.add_argument("--acdc_root", help="ACDC folder: build one datalist per --label_splits instead of --datalist")
    ap.add_argument("--labeled", type=int, default=1, help="with --acdc_root: labeled patients per split")
    ap.add_argument(
        "--label_splits",
        nargs="+",
        default=["standard"],
        help="with --acdc_root: 'standard' and/or integer seeds drawing other labeled patients",
    )
    ap.add_argument("--dataset", default=None, help="dataset overlay under configs/, e.g. dataset_acdc.yaml")
    ap.add_argument("--variants", nargs="+", required=True, help="name=overlay[,overlay...] (overlays under configs/)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[12345, 2])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="screen")
    ap.add_argument("--section", default="validation")
    ap.add_argument("--parallel", type=int, default=1, help="runs side by side (each with num_threads 1 when > 1)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    ap.add_argument(
        "--variant_set",
        nargs="*",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="overrides for one variant, e.g. swin_lr:learning_rate_b=0.0005",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--no_flip_tta",
        action="store_true",
        help="skip the extra evaluation with mirror test-time augmentation (models trained with flips)",
    )
    ap.add_argument(
        "--no_largest_component",
        action="store_true",
        help="skip the extra evaluation with the largest connected piece of each class kept",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if bool(args.datalist) == bool(args.acdc_root):
        raise SystemExit("give exactly one of --datalist and --acdc_root")
    out.mkdir(parents=True, exist_ok=True)
    if args.datalist:
        datalists: dict[str | None, str] = {None: str(Path(args.datalist).resolve())}
    else:
        datalists = acdc_datalists(
            args.acdc_root, args.labeled, list(dict.fromkeys(args.label_splits)), out / "datalists"
        )
    overrides = dict(PRESETS[args.preset])
    if args.parallel > 1:
        overrides.update(num_threads="1", registration_workers="1", num_workers="1")
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = v
    per_variant: dict[str, dict[str, str]] = {}
    for item in args.variant_set:
        name, _, kv = item.partition(":")
        k, _, v = kv.partition("=")
        if not (name and k and v):
            raise SystemExit(f"--variant_set: {item!r} is not NAME:KEY=VALUE")
        per_variant.setdefault(name, {})[k] = v
    variants = [parse_variant(v) for v in args.variants]
    unknown = set(per_variant) - {name for name, _ in variants}
    if unknown:
        raise SystemExit(f"--variant_set names {sorted(unknown)} that are not among --variants")
    runs = []
    for split, datalist in datalists.items():
        for name, overlays in variants:
            for seed in args.seeds:
                run = Run(name, overlays, seed, out, {**overrides, **per_variant.get(name, {})}, datalist, split)
                run.folder = out / run.name
                runs.append(run)
    todo = [r for r in runs if not r.result_path.exists()]
    print(f"protocol: {len(runs)} runs, {len(runs) - len(todo)} already done, writing {out / 'table.md'}", flush=True)

    def refresh() -> None:
        results = [json.loads(r.result_path.read_text()) for r in runs if r.result_path.exists()]
        md, js = table(results, runs, args.preset, args.section, overrides, per_variant)
        write_text(out / "table.md", md)
        write_json(out / "table.json", js)

    out.mkdir(parents=True, exist_ok=True)
    refresh()
    failures = []

    def one(run: Run) -> None:
        try:
            if not run.result_path.exists():
                execute(run, args.dataset, args.section)
            if not args.no_flip_tta and run.result_path.exists():
                add_tta(run, args.section)
            if not args.no_largest_component and run.result_path.exists():
                add_largest_component(run, args.section)
            print(f"protocol: {run.name} done", flush=True)
        except RuntimeError as exc:
            failures.append(str(exc))
            print(f"protocol: {exc}", flush=True)
        refresh()

    def lacks_an_evaluation(run: Run) -> bool:  # finished runs evaluated before a column existed get it too
        result = json.loads(run.result_path.read_text())
        return (not args.no_flip_tta and "tta_dice" not in result and mirror_trained(run)) or (
            not args.no_largest_component and "lcc_metrics" not in result
        )

    todo = [r for r in runs if r not in todo and lacks_an_evaluation(r)] + todo
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        list(pool.map(one, todo))
    if failures:
        raise SystemExit("protocol: " + "; ".join(failures))


if __name__ == "__main__":
    main()
