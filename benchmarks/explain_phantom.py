"""Explanations on the phantom set: do the maps of the demo model point at the lesions?

Scores every method (and the CAM family at a second, finer layer) against the ground-truth lesion
masks of the demo run's test split and prints one markdown table: pointing game, box IoU and
energy in mask with 95 % bootstrap intervals, deletion / insertion AUC, the randomised-weights
Spearman correlation and seconds per image.

    medsight demo --out /tmp/explain-demo            # once, ~2.5 min (HF_HUB_OFFLINE=1)
    python benchmarks/explain_phantom.py --run /tmp/explain-demo/run --limit 100
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from medsight.explain.cam import METHODS
from medsight.explain.localisation import score_localisation
from medsight.stats import format_value_ci

CAM_FAMILY = ("gradcam", "gradcam++", "scorecam", "eigencam", "layercam")


def _fmt(entry: dict | None, digits: int = 3) -> str:
    return format_value_ci(entry, digits)  # "0.85 (0.78–0.92)", "—" when missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/explain-demo/run")
    parser.add_argument("--limit", type=int, default=100, help="lesion images to score")
    parser.add_argument("--faithfulness", type=int, default=16, help="images for del/ins, sanity")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--extra-layer",
        default="backbone.stage2",
        help="more target layers for the CAM family, ';'-separated (a fused set of stages is"
        " comma-separated: 'backbone.stage2;backbone.stage1,backbone.stage2'); '' to skip",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: busy cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)

    methods = [m for m in args.methods.split(",") if m]
    passes = [(methods, None)]
    cams = [m for m in methods if m in CAM_FAMILY]
    for layer in filter(None, args.extra_layer.split(";")) if cams else []:
        passes.append((cams, layer))
    rows, started, info = [], time.perf_counter(), {}
    for chosen, layer in passes:
        result = score_localisation(
            args.run,
            methods=chosen,
            limit=args.limit,
            layer=layer,
            faithfulness=args.faithfulness,
            write=False,
        )
        info = result
        for method, entry in result["methods"].items():
            faith = (result.get("faithfulness") or {}).get(method) or {}
            sanity = ((result.get("sanity") or {}).get(method) or {}).get("spearman")
            rows.append(
                (
                    method,
                    entry["layer"],
                    _fmt(entry["pointing_game"]),
                    _fmt(entry["box_iou"]),
                    _fmt(entry["energy_in_mask"]),
                    _fmt(faith.get("deletion_auc")),
                    _fmt(faith.get("insertion_auc")),
                    _fmt(sanity, 2),
                    f"{entry['seconds_per_image']:.3f}",
                )
            )
    print(
        f"run {args.run}: {info['n_images']} lesion images of the {info['split']} split "
        f"(classes {', '.join(info['lesion_classes'])}), maps for the true class; "
        f"faithfulness on {info.get('n_faithfulness_images', 0)}; "
        f"{time.perf_counter() - started:.0f} s in all, {args.threads} thread(s)\n"
    )
    print(
        "| method | layer | pointing game | box IoU | energy in mask | deletion AUC ↓ "
        "| insertion AUC ↑ | sanity ρ ↓ | s / image |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
