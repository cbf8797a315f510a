"""``medsight train``'s options, derived from the config model: one source of truth.

A :class:`~medsight.config.TrainConfig` field marked ``json_schema_extra=flag("--lr")`` becomes
the option ``--lr``: its help is the field's ``description`` (with the field's default), its
choices the field's ``Literal`` (or ``flag(choices=...)``), its value the dotted field it sets.
``train``, ``tune`` and ``cv`` get the same options from :func:`with_train_options`, beside
``--config``, ``--set KEY=VALUE`` (any field, named or not) and ``--overwrite``;
:func:`train_config` turns the received values back into a ``TrainConfig``.

Only pydantic and the config are imported here, so ``medsight --help`` starts fast.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from medsight.config import DataConfig, TrainConfig
from medsight.errors import ConfigError

__all__ = ["TRAIN_OPTIONS", "TrainOption", "parse_set", "train_config", "with_train_options"]

#: The help panel of each config section (top-level fields go with --config and --set).
_PANELS = {"": "Run", "data": "Data", "model": "Model", "optim": "Optimisation"}


@dataclass(frozen=True)
class TrainOption:
    """One flag of ``medsight train``: the dotted field it sets and the Typer parameter."""

    key: str  # "optim.batch_size"
    flag: str  # "--batch-size", "--cache/--no-cache"
    param: inspect.Parameter  # named after the flag ("batch_size"); default None: not given

    @property
    def name(self) -> str:
        return self.param.name


def _options(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[TrainOption]:
    options = []
    # required fields (data.path) first, then in the order the config declares them
    fields = sorted(model.model_fields.items(), key=lambda item: not item[1].is_required())
    for name, info in fields:
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            options += _options(annotation, f"{prefix}{name}.")
        elif isinstance(info.json_schema_extra, dict) and "cli" in info.json_schema_extra:
            options.append(_option(prefix + name, info))
    return options


def _option(key: str, info: FieldInfo) -> TrainOption:
    extra: dict = info.json_schema_extra  # type: ignore[assignment]
    flag = extra["cli"]
    kind = _kind(key, info.annotation, extra.get("choices"))
    help_text = (info.description or "").rstrip(".")
    help_text = help_text[:1].upper() + help_text[1:] + "."
    if extra.get("show_default", True) and not info.is_required():
        shown = _shown_default(flag, info.default)
        # the config's default, shown as Typer shows its own (the flag's default is None: unset)
        help_text += rf" \[default: {shown}]" if shown else ""
    section = key.rpartition(".")[0]
    option = typer.Option(
        flag,  # Typer reads an on/off pair from one declaration: "--cache/--no-cache"
        help=help_text,
        rich_help_panel=_PANELS.get(section, section),
        show_default=False,
    )
    param = inspect.Parameter(
        flag.split("/")[0].lstrip("-").replace("-", "_"),
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[kind | None, option],
    )
    return TrainOption(key, flag, param)


def _kind(key: str, annotation: Any, choices: tuple[str, ...] | None) -> Any:
    """The Python type Typer parses a field's flag into (an Enum for a set of choices)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation, *others = [a for a in get_args(annotation) if a is not type(None)]
        if others and _number_or_word(annotation, *others):
            return str  # "--epochs 12" or "--epochs auto": the config reads the text
        if others:
            raise TypeError(f"{key}: a field of several types cannot be a flag; use --set")
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
    elif annotation not in (str, int, float, bool):
        raise TypeError(f"{key}: a {annotation} field cannot be a flag; use --set")
    if choices is None:
        return annotation
    if not all(isinstance(c, str) for c in choices):
        raise TypeError(f"{key}: only text choices can be a flag; use --set")
    title = "".join(part.title() for part in key.rpartition(".")[2].split("_"))
    return Enum(title, {c: c for c in choices}, type=str)  # Typer shows Enum values as choices


def _number_or_word(*kinds: Any) -> bool:
    """Whether a field of these types is a number or one of some words (``int | "auto"``)."""
    words = [k for k in kinds if get_origin(k) is Literal]
    numbers = [k for k in kinds if k in (int, float)]
    texts = all(isinstance(c, str) for k in words for c in get_args(k))
    return bool(words and numbers) and texts and len(words) + len(numbers) == len(kinds)


def _shown_default(flag: str, default: Any) -> str | None:
    if isinstance(default, bool):
        on, _, off = flag.partition("/")
        return (on if default else off).lstrip("-") or None
    return None if default is None else str(default)


#: Every flag derived from the config, in field order.
TRAIN_OPTIONS: tuple[TrainOption, ...] = tuple(_options())

_RUN = _PANELS[""]
_SHARED_EXTRA = [
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option("--config", help="YAML config; flags override it.", rich_help_panel=_RUN),
        ],
    ),
    inspect.Parameter(
        "set_",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                metavar="KEY=VALUE",
                help="Set any config field by its dotted name, e.g. optim.warmup_epochs=0.5 "
                "(repeatable; the value is read as YAML; wins over the named flags).",
                rich_help_panel=_RUN,
                show_default=False,
            ),
        ],
    ),
    inspect.Parameter(
        "overwrite",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option("--overwrite", help="Replace an existing run.", rich_help_panel=_RUN),
        ],
    ),
]


def with_train_options(func):
    """Give a command the training options after its own (``train``, ``tune`` and ``cv`` train
    alike); the command takes them as ``**options`` and passes them to :func:`train_config`.

    Typer reads the signature built here: the command's own parameters, then ``--config``,
    ``--set``, ``--overwrite`` and one parameter per :data:`TRAIN_OPTIONS` entry (named after its
    flag). A name declared twice is a programming error, raised at import.
    """
    own = [
        p
        for p in inspect.signature(func, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    params = own + _SHARED_EXTRA + [option.param for option in TRAIN_OPTIONS]
    names = [p.name for p in params]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise TypeError(f"{func.__name__}: parameters {clashes} are declared twice")
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["optim.lr=0.01", "data.window=[-1000, 400]"]`` → dotted key → value (read as YAML).

    >>> parse_set(["optim.lr=0.01", "model.weights=null"])
    {'optim.lr': 0.01, 'model.weights': None}
    """
    values = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=0.01), got {item!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
        if isinstance(value, (bool, int, float)) and _is_text(key):
            value = text  # a class named 1 stays "1": a text field takes the text as typed
        values[key] = value
    return values


def _is_text(key: str) -> bool:
    """Whether the field at ``key`` holds text only (``str`` or ``str | None``)."""
    model: Any = TrainConfig
    *sections, name = key.split(".")
    for section in sections:
        info = getattr(model, "model_fields", {}).get(section)
        model = info.annotation if info else None
    info = getattr(model, "model_fields", {}).get(name)
    kinds = set(get_args(info.annotation) or [info.annotation]) if info else set()
    return bool(kinds) and kinds - {type(None)} == {str}


def train_config(options: dict[str, Any], default_out: str = "runs/{stem}") -> TrainConfig:
    """The TrainConfig that the options describe: ``--config`` (or ``--data``), then the named
    flags, then ``--set``; without ``--config`` or ``--out`` the run goes to ``default_out``."""
    named = {}
    for option in TRAIN_OPTIONS:
        value = options.get(option.name)
        named[option.key] = value.value if isinstance(value, Enum) else value
    extra = parse_set(options.get("set_"))
    path = extra.get("data.path", named["data.path"])
    if options.get("config") is not None:
        base = TrainConfig.from_yaml(options["config"])
    elif path is not None:
        base = TrainConfig(data=DataConfig(path=str(path)))
    else:
        raise ConfigError("give --data PATH (or --config FILE.yaml)")
    resolved = base.with_overrides(named).with_overrides(extra, keep_none=True)
    if options.get("config") is None and named["out"] is None and "out" not in extra:
        stem = Path(resolved.data.path).stem
        resolved = resolved.with_overrides({"out": default_out.format(stem=stem)})
    return resolved
