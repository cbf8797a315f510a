"""Optional experiment logging: TensorBoard or MLflow, when the user has installed them.

Neither is a dependency of medsight; asking for one that is missing is a clear error with the
install command, never an ImportError deep inside training.
"""

from __future__ import annotations

from pathlib import Path

from medsight.errors import ConfigError

LOGGERS = ("none", "tensorboard", "mlflow")


class EpochLogger:
    """Receives each epoch's history row; the base class logs nothing."""

    def log(self, row: dict, epoch: int) -> None:  # noqa: B027 - a deliberate no-op default
        pass

    def close(self) -> None:  # noqa: B027
        pass


class _TensorBoard(EpochLogger):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict, epoch: int) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)

    def close(self) -> None:
        self.writer.close()


class _MLflow(EpochLogger):
    def __init__(self, run_dir: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: v for k, v in _flatten(config).items() if v is not None})

    def log(self, row: dict, epoch: int) -> None:
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
        self.mlflow.log_metrics(numbers, step=epoch)

    def close(self) -> None:
        self.mlflow.end_run()


def create_logger(kind: str, run_dir: Path, config: dict) -> EpochLogger:
    """The logger ``kind`` names (``none``, ``tensorboard``, ``mlflow``)."""
    if kind not in LOGGERS:
        raise ConfigError(f"log must be one of {', '.join(LOGGERS)}, got {kind!r}")
    try:
        if kind == "tensorboard":
            return _TensorBoard(run_dir)
        if kind == "mlflow":
            return _MLflow(run_dir, config)
    except ImportError:
        raise ConfigError(f"--log {kind} needs the {kind} package: pip install {kind}") from None
    return EpochLogger()


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
