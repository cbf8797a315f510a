"""Does tuning + a 5-fold ensemble beat the default recipe? Runs the CLI as a user would.

For one set: ``medsight train`` (default recipe) → ``medsight tune`` (``--timeout`` minutes,
SQLite storage) → ``medsight cv --config <tuned>/config.yaml --folds 5`` (whose fold models
are combined into an ensemble and tested) → ``medsight compare default ensemble tuned``.
Prints a markdown table of test AUROC / accuracy with 95 % CIs, the paired p-value of each
against the default, and the wall time of every step.

Usage: python benchmarks/tune_cv_ensemble.py --set pneumoniamnist|phantom --work DIR
       [--timeout 30] [--folds 5] [--threads N]
Two sets can run side by side with ``--threads 1`` each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED  # noqa: E402

SETS = {
    "pneumoniamnist": SHARED / "pneumoniamnist" / "pneumoniamnist.npz",
    "phantom": None,  # written with `medsight data synth` (1,200 images, 64 px, seed 0)
}


def medsight(*args: str, log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ medsight {' '.join(args)}\n")
        handle.flush()
        subprocess.run(["medsight", *args], check=True, stdout=handle, stderr=handle)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", choices=sorted(SETS), required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=30.0, help="tuning minutes")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work / args.set
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    data = SETS[args.set]
    seconds: dict[str, float] = {}
    if data is None:
        data = work / "data"
        if not data.exists():
            medsight("data", "synth", str(data), "--n", "1200", "--size", "64", log=log)
    default, tuned, cv = work / "default", work / "tuned", work / "cv"
    if not (default / "metrics.json").exists():
        seconds["train (default)"] = medsight(
            "train", "--data", str(data), "--out", str(default), "--overwrite", log=log
        )
        medsight("evaluate", str(default), log=log)
    if not (tuned / "metrics.json").exists():
        seconds["tune"] = medsight(
            "tune",
            "--data",
            str(data),
            "--trials",
            "500",
            "--timeout",
            str(args.timeout),
            "--storage",
            f"sqlite:///{work / 'tune.db'}",
            "--out",
            str(tuned),
            "--overwrite",
            log=log,
        )
        medsight("evaluate", str(tuned), log=log)
    if not (cv / "cv.json").exists():
        seconds["cv + ensemble"] = medsight(
            "cv",
            "--config",
            str(tuned / "config.yaml"),
            "--folds",
            str(args.folds),
            "--out",
            str(cv),
            "--resume",
            log=log,
        )
    from medsight.evaluation.compare import compare_runs

    compared = compare_runs([default, cv / "ensemble", tuned])
    tune_summary = json.loads((tuned / "tune.json").read_text())
    cv_summary = json.loads((cv / "cv.json").read_text())
    print(f"## {args.set}\n")
    print("| run | test AUROC (95 % CI) | accuracy (95 % CI) | p vs default (AUROC) |")
    print("|---|---|---|---|")
    names = ["default recipe", f"{args.folds}-fold ensemble of the tuned recipe", "tuned, one run"]
    for name, row in zip(names, compared["runs"]):
        m = row["metrics"]
        paired = row.get("paired") or {}
        p = paired.get("p_value")
        print(
            f"| {name} | {_ci(m['auroc'])} | {_ci(m['accuracy'])} | "
            f"{'' if p is None else f'{p:.3g}'} |"
        )
    oof = cv_summary["oof"]
    print(
        f"\npooled OOF AUROC {_ci(oof['auroc'])} over n={oof['n']}; folds "
        f"{cv_summary['mean_sd']['val']['auroc']['mean']:.3f} ± "
        f"{cv_summary['mean_sd']['val']['auroc']['sd']:.3f}"
    )
    print(
        f"tuning: {tune_summary['counts']} trials; best #{tune_summary['best']['number']} "
        f"val {tune_summary['metric']} {tune_summary['best']['value']:.4f}; "
        f"params {tune_summary['best']['params']}"
    )
    print(f"importances: {tune_summary['importances']}")
    print(f"wall seconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")


def _ci(entry: dict) -> str:
    if entry.get("value") is None:
        return "–"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


if __name__ == "__main__":
    main()
