"""medsight: train, evaluate, explain and serve medical image classifiers.

The public API is small; everything else lives in its subpackage::

    import medsight
    table = medsight.load_samples("data/chest_xray.zip")     # one SampleTable for any layout
    table = medsight.assign_splits(table, seed=0)            # patient-grouped, stratified
    report = medsight.check_samples(table)                   # unreadable, duplicates, leakage
    run = medsight.train(TrainConfig(data=DataConfig(path="phantom/"), out="runs/p"))
    probs = medsight.Predictor.from_run("runs/p").predict_files(["scan.dcm"])
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Predictor",
    "__version__",
    "assign_splits",
    "check_samples",
    "decode",
    "load_samples",
    "train",
]


def __getattr__(name: str):
    # Lazy so that `import medsight` (and the CLI's start-up) stays fast.
    if name == "load_samples":
        from medsight.data.sources import load_samples

        return load_samples
    if name == "assign_splits":
        from medsight.data.splits import assign_splits

        return assign_splits
    if name == "check_samples":
        from medsight.data.checks import check_samples

        return check_samples
    if name == "decode":
        from medsight.data.imaging import decode

        return decode
    if name == "train":
        from medsight.training.trainer import train

        return train
    if name == "Predictor":
        from medsight.inference import Predictor

        return Predictor
    raise AttributeError(f"module 'medsight' has no attribute {name!r}")
