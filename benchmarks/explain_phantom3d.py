"""3-D phantom over several seeds: which map finds the lesion in volumes, run after run?

For each seed: `medsight data synth --3d` (240 volumes of 32³, spherical lesions with mask
volumes), `medsight train` with the default recipe, `medsight evaluate`, `medsight explain --masks`
(every method, the layers a 3-D run searches). Prints one markdown table: the test AUROC, the map
`explain --masks` chose, and for the map an unscored 3-D run falls back to (Grad-CAM++ on the
first stage) and for plain Grad-CAM the pointing game and the randomisation check's ρ.

    python benchmarks/explain_phantom3d.py --seeds 0,1,2,3 --out /tmp/phantom3d
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FALLBACK = ("gradcam++", "backbone.stem")


def _medsight(*args: str) -> None:
    command = [sys.executable, "-m", "medsight", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _layer_scores(entry: dict) -> dict[str, dict]:
    """Every layer a method was scored on → its pointing game and sanity entry."""
    scores = {entry["layer"]: {"pointing_game": entry["pointing_game"], "sanity": None}}
    for layer, tried in (entry.get("layers_tried") or {}).items():
        scores[layer] = {"pointing_game": tried["pointing_game"], "sanity": tried.get("sanity")}
    return scores


def _cell(score: dict | None) -> str:
    if not score:
        return "—"
    point = score["pointing_game"]["value"]
    sanity = score.get("sanity") or {}
    rho = (sanity.get("spearman") or {}).get("value")
    mark = "" if sanity.get("passes", True) else " ✗"
    return f"{point:.2f} (ρ {rho:.2f}{mark})" if rho is not None else f"{point:.2f}"


def run_seed(seed: int, root: Path) -> dict:
    data, run = root / f"data{seed}", root / f"run{seed}"
    started = time.perf_counter()
    _medsight("data", "synth", str(data), "--3d", "--n", "240", "--seed", str(seed))
    _medsight("train", "--data", str(data), "--out", str(run), "--seed", str(seed), "--overwrite")
    _medsight("evaluate", str(run))
    _medsight("explain", str(run), "--masks")
    metrics = json.loads((run / "metrics.json").read_text())
    found = json.loads((run / "localisation.json").read_text())
    best = found["best_method"]
    methods = found["methods"]
    chosen = methods[best]
    sanity = found["sanity"]
    fallback = _layer_scores(methods[FALLBACK[0]]).get(FALLBACK[1])
    if fallback is not None and fallback["sanity"] is None:  # the method's kept layer
        fallback["sanity"] = sanity.get(FALLBACK[0])
    gradcam = {
        layer: {**score, "sanity": score["sanity"] or sanity.get("gradcam")}
        for layer, score in _layer_scores(methods["gradcam"]).items()
    }
    best_gradcam = max(gradcam.values(), key=lambda s: s["pointing_game"]["value"])
    return {
        "seed": seed,
        "auroc": metrics["auroc"]["value"],
        "lesions": found["n_images"],
        "chosen": f"{best} · {chosen['layer'].removeprefix('backbone.')}",
        "chosen_score": {"pointing_game": chosen["pointing_game"], "sanity": sanity.get(best)},
        "fallback": fallback,
        "gradcam": best_gradcam,
        "minutes": (time.perf_counter() - started) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--out", default="/tmp/phantom3d")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = [run_seed(int(s), root) for s in args.seeds.split(",")]
    print(
        "| seed | test AUROC | lesions | chosen by `--masks` | its pointing game | "
        "fallback: gradcam++ · stem | plain gradcam, best layer | minutes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['auroc']:.3f} | {r['lesions']} | {r['chosen']} | "
            f"{_cell(r['chosen_score'])} | {_cell(r['fallback'])} | {_cell(r['gradcam'])} | "
            f"{r['minutes']:.1f} |"
        )


if __name__ == "__main__":
    main()
