"""Multi-label phantoms: the default recipe's AUROC per finding, and where the maps point.

`medsight data synth --multilabel` (1,200 images, 64 px: nodule, cyst, calcification; none, one
or several per slice), `medsight train --data DIR` with no other flag, `medsight evaluate`
(the run's test split: per-finding AUROC and AP with 95 % bootstrap intervals over images), then
the pointing game of each finding's map against that finding's mask for a few CAM methods, at
the default layer (the last stage) and fused over stages 1–3, with the randomisation check.
Prints markdown tables.
Usage: python benchmarks/multilabel_phantom.py [--work /tmp/mlb] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from medsight.config import DataConfig, TrainConfig
from medsight.data.synth import write_multilabel_phantoms
from medsight.evaluation.evaluate import evaluate_run
from medsight.explain.localisation import score_localisation
from medsight.stats import format_value_ci
from medsight.training.trainer import train

METHODS = ("gradcam", "gradcam++", "layercam")
FUSED = "backbone.stage1,backbone.stage2,backbone.stage3"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, help="keep data and run here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlb-"))
    data, out = work / "data", work / "run"

    started = time.perf_counter()
    write_multilabel_phantoms(data, n=1200, size=64, seed=args.seed)
    config = TrainConfig(data=DataConfig(path=str(data)), out=str(out), seed=args.seed)
    run = train(config, overwrite=True)
    trained = time.perf_counter() - started
    metrics = evaluate_run(run.path)
    history = run.history()

    print(
        f"network {run.model_config['name']}, {len(history)} validations, "
        f"train + data {trained:.0f} s, test n = {metrics['n']}\n"
    )
    print("| finding | test prevalence | AUROC (95 % CI) | AP (95 % CI) |")
    print("|---|---|---|---|")
    for name, entry in metrics["per_finding"].items():
        print(
            f"| {name} | {entry['prevalence']['value']:.2f} | {format_value_ci(entry['auroc'])} "
            f"| {format_value_ci(entry['average_precision'])} |"
        )
    print(
        f"| macro | | {format_value_ci(metrics['auroc_macro'])} "
        f"| {format_value_ci(metrics['average_precision_macro'])} |\n"
    )

    print("| method | layer | pointing game, all | per finding | sanity ρ (95 % CI) | s/image |")
    print("|---|---|---|---|---|---|")
    for layer in (None, FUSED):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = score_localisation(
                run.path, methods=METHODS, layer=layer, faithfulness=16, write=False
            )
        for method, entry in result["methods"].items():
            each = ", ".join(
                f"{name} {format_value_ci(v['pointing_game'])} (n={v['n_images']})"
                for name, v in entry["per_finding"].items()
            )
            sanity = result["sanity"][method]["spearman"]
            print(
                f"| {method} | {entry['layer']} | {format_value_ci(entry['pointing_game'])} "
                f"| {each} | {format_value_ci(sanity)} | {entry['seconds_per_image']:.3f} |"
            )


if __name__ == "__main__":
    main()
