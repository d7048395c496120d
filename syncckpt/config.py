"""The ``checkpointing:`` section of a training config, validated, and a YAML loader with one-line errors.

Users know these keys from the original write-up (``save_every_n_batches``, ``save_total_limit`` ...); this
module keeps those names and translates them into :class:`syncckpt.CheckpointManager` arguments, so a config
file and the Python API can never disagree about what a key means.

>>> cfg = CheckpointingConfig.model_validate({"save_every_n_batches": 250, "remote": "s3://bucket/run-1"})
>>> kw = cfg.manager_kwargs()
>>> kw["save_every_n_steps"], kw["keep_epochs"], kw["metric_for_best"], kw["remote"]
(250, 3, 'val_f1_macro', 's3://bucket/run-1')
>>> validate_config({"save_every_n_batchs": 250}, CheckpointingConfig, source="my.yaml")
Traceback (most recent call last):
...
syncckpt.errors.ConfigError: my.yaml: save_every_n_batchs: unknown key (did you mean 'save_every_n_batches'?)
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .deadline import parse_duration
from .env import check_mirror_url
from .errors import ConfigError

__all__ = ["CheckpointingConfig", "load_config", "validate_config", "resolve_config_path"]

M = TypeVar("M", bound=BaseModel)

# strict=True refuses the silent coercions that hide typos in YAML ("500" for 500, 1.5 for an int, "yes" for a
# bool); ints are still accepted where a float is expected, which is what people write.
STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True)


class CheckpointingConfig(BaseModel):
    """The ``checkpointing:`` section. Key names follow the original write-up; the new keys are cloud extras.

    ``save_every_n_batches`` counts optimizer steps (with gradient accumulation 8, ``checkpoint-step-2000`` is
    taken after batch 15999, counted from 0); ``null`` disables step checkpoints, a missing key means 500.

    >>> CheckpointingConfig.model_validate({"save_every_n_batches": None}).manager_kwargs()["save_every_n_steps"]
    >>> CheckpointingConfig(save_strategy="epoch").manager_kwargs()["metric_for_best"] is None
    True
    >>> CheckpointingConfig.model_validate({"save_total_limit": 0})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for CheckpointingConfig
    ...
    """

    model_config = STRICT

    save_dir: str = Field("./checkpoints", min_length=1, description="Local checkpoint folder.")
    save_strategy: Literal["epoch", "best"] = Field(
        "best", description='"best" also keeps best_model by metric_for_best; "epoch" keeps epoch checkpoints only.'
    )
    metric_for_best: str | None = Field("val_f1_macro", description="Epoch metric that decides best_model.")
    mode: Literal["max", "min"] = Field("max", description="Whether a larger or smaller metric_for_best is better.")
    save_total_limit: int = Field(3, ge=1, description="Epoch checkpoints to keep (the newest ones).")
    save_every_n_epochs: int = Field(1, ge=1, description="Write an epoch checkpoint every N epochs.")
    save_every_n_batches: int | None = Field(
        500, ge=1, description="Step checkpoint every N optimizer steps; null disables step checkpoints."
    )
    save_every_n_minutes: float | None = Field(
        None, gt=0, description="Also take a step checkpoint when this many minutes passed since the last one."
    )
    keep_last: int = Field(1, ge=1, description="Step checkpoints to keep (the newest ones).")
    keep_local: Literal["all", "newest", "none"] = Field(
        "all", description='With a remote: local copies kept once mirrored ("all" that retention keeps).'
    )
    remote: str | None = Field(None, min_length=1, description="Mirror to this URL (s3://, gs://, hf://, file://).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the remote store.")
    on_upload_error: Literal["warn", "raise"] = Field(
        "warn", description='"warn" keeps training when an upload fails for good; "raise" stops it.'
    )
    deadline: str = Field(
        "auto",
        description='Session deadline: "auto" (Kaggle\'s and Colab\'s limits), "off", a duration from the session '
        'start ("11h30m") or a local date and time ("2025-06-01T18:00"); see syncckpt.deadline.',
    )

    @field_validator("deadline", mode="before")
    @classmethod
    def _yaml_deadline(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false, and a bare date and time as a datetime: both mean what was written.
        if value is False or value is None:
            return "off"
        if isinstance(value, datetime):
            return value.isoformat()
        if not isinstance(value, str):  # 3600: a number without a unit
            raise ValueError(f"{_DEADLINE_EXPECTED} (got {value!r}; a duration needs a unit: '60m')")
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_value(cls, value: str) -> str:
        # A field validator, so the error names checkpointing.deadline (or the flag that set it).
        deadline_argument(value)
        return value

    @field_validator("remote")
    @classmethod
    def _remote_can_mirror(cls, value: str | None) -> str | None:
        # A field validator, so the error names checkpointing.remote (or the flag that set it) and the file.
        if value is not None:
            try:
                check_mirror_url(value)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return value

    @field_validator("metric_for_best")
    @classmethod
    def _best_needs_metric(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator (not a model one) so the error names checkpointing.metric_for_best.
        if info.data.get("save_strategy") == "best" and not value:
            raise ValueError('required when save_strategy is "best" (or set save_strategy: epoch)')
        return value

    def manager_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`syncckpt.CheckpointManager`, named the way the manager names them.

        >>> sorted(CheckpointingConfig().manager_kwargs())  # doctest: +NORMALIZE_WHITESPACE
        ['deadline', 'directory', 'keep_epochs', 'keep_last', 'keep_local', 'metric_for_best', 'mode',
         'on_upload_error', 'remote', 'save_every_n_epochs', 'save_every_n_minutes', 'save_every_n_steps',
         'storage_options']
        """
        return {
            "directory": self.save_dir,
            "save_every_n_steps": self.save_every_n_batches,
            "save_every_n_minutes": self.save_every_n_minutes,
            "save_every_n_epochs": self.save_every_n_epochs,
            "keep_last": self.keep_last,
            "keep_local": self.keep_local,
            "keep_epochs": self.save_total_limit,
            "metric_for_best": self.metric_for_best if self.save_strategy == "best" else None,
            "mode": self.mode,
            "remote": self.remote,
            "storage_options": dict(self.storage_options),
            "on_upload_error": self.on_upload_error,
            "deadline": deadline_argument(self.deadline),
        }


def deadline_argument(text: str) -> str | datetime:
    """The manager's ``deadline=`` for a config value: ``"auto"``, ``"off"`` and durations as written, an ISO date
    and time as a :class:`~datetime.datetime` (local time unless it names a zone). ValueError when it is none of
    these.

    >>> deadline_argument("11h30m"), deadline_argument("2025-06-01T18:00")
    ('11h30m', datetime.datetime(2025, 6, 1, 18, 0))
    """
    value = text.strip()
    if value in ("auto", "off"):
        return value
    try:
        parse_duration(value)
        return value
    except ConfigError:
        pass
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{_DEADLINE_EXPECTED} (got {text!r})") from None


_DEADLINE_EXPECTED = (
    "expected 'auto', 'off', a duration such as '11h30m' or '90m', or a date and time such as '2025-06-01T18:00'"
)


# ---- loading -----------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-5`` as a float and refuses duplicate keys.

    YAML 1.1 (PyYAML) needs a dot in exponent floats, so ``learning_rate: 2e-5`` would otherwise arrive as the
    string "2e-5" and fail validation with a confusing type error. A repeated key would silently win over the
    first one, which is how an edited config ends up not doing what its reader sees.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def resolve_config_path(
    path_or_name: str | os.PathLike[str], search_dirs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Find a config file: an existing path as given, else ``config/<name>[.yaml|.yml]`` under the current
    directory, then under each of ``search_dirs`` (a script passes its repository root).

    A bare name like ``base_config`` thus finds ``./config/base_config.yaml``, which is how the original scripts
    were called (``--config base_config``), and a copy in the current directory wins over the repository's.

    >>> resolve_config_path("nope", search_dirs=["/nonexistent"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    syncckpt.errors.ConfigError: config file not found: nope (looked for nope.yaml in .../config, /nonexistent/config)
    """
    given = Path(path_or_name).expanduser()
    if given.is_file():
        return given
    # Only a bare name is looked up under config/: a path with folders means exactly that path.
    if given.parent != Path(".") or given.is_absolute():
        raise ConfigError(f"config file not found: {given}")
    names = [given.name] if given.suffix in (".yaml", ".yml") else [f"{given.name}.yaml", f"{given.name}.yml"]
    folders = list(dict.fromkeys(Path(d).expanduser().absolute() / "config" for d in [Path.cwd(), *search_dirs]))
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(
        f"config file not found: {path_or_name} (looked for {names[0]} in {', '.join(str(f) for f in folders)})"
    )


def load_config(
    path_or_name: str | os.PathLike[str],
    schema: type[M],
    *,
    search_dirs: Iterable[str | os.PathLike[str]] = (),
    overrides: Mapping[str, Any] | None = None,
    override_names: Mapping[str, str] | None = None,
) -> M:
    """Read a YAML config and validate it with ``schema``; any problem is one :class:`ConfigError` line.

    ``overrides`` maps dotted key paths to values (e.g. ``{"checkpointing.remote": "s3://b/run"}``); ``None``
    values are skipped, so unset command-line flags can be passed straight through. The message of every error
    names the file and the key path, e.g. ``config/base_config.yaml: checkpointing.save_every_n_batches: ...``,
    or, for a value that came from an override, how the user gave it (``override_names``: dotted key path ->
    name, e.g. ``{"training.epochs": "--epochs"}``): ``--epochs: input should be greater than or equal to 1``.
    """
    path = resolve_config_path(path_or_name, search_dirs)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    given = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value, source=str(path))
            given[dotted] = (override_names or {}).get(dotted, f"{path}: {dotted}")
    return validate_config(data, schema, source=str(path), names=given)


def validate_config(
    data: Mapping[str, Any], schema: type[M], *, source: str = "<config>", names: Mapping[str, str] | None = None
) -> M:
    """Validate already-parsed config data; raise :class:`ConfigError` naming ``source`` and the key path (or the
    name in ``names`` given for that key path, e.g. the command-line flag that set it).

    >>> validate_config({"save_every_n_batches": "500"}, CheckpointingConfig, source="cfg.yaml")
    Traceback (most recent call last):
    ...
    syncckpt.errors.ConfigError: cfg.yaml: save_every_n_batches: expected an integer or null, got '500' (str)
    >>> validate_config({"keep_last": 2}, CheckpointingConfig).keep_last
    2
    """
    try:
        return schema.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_one_line(e, schema, source, names or {})) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parents[: i + 1])}: expected a section (mapping), got {child!r}")
        node = child
    node[leaf] = value


def _one_line(err: ValidationError, schema: type[BaseModel], source: str, names: Mapping[str, str]) -> str:
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = [p for p in first["loc"] if not _is_union_branch(p)]
    key = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{names.get(key, f'{source}: {key}')}: {_describe(first, loc, schema)}{more}"


def _is_union_branch(part: Any) -> bool:
    # pydantic appends the union member it tried ("int", "function-after[...]") to the location; users never
    # wrote those, so they would only blur the key path.
    return isinstance(part, str) and (part in ("int", "float", "str", "bool", "none", "dict", "list") or "[" in part)


def _describe(e: Mapping[str, Any], loc: list[Any], schema: type[BaseModel]) -> str:
    kind, value = e["type"], e.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(schema, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.75)
        if close:
            return f"unknown key (did you mean {close[0]!r}?)"
        return f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return str(e["msg"]).removeprefix("Value error, ")
    field = _field_for(schema, loc)
    expected = _expected(field.annotation) if field is not None else None
    if expected and (kind.endswith(("_type", "_parsing", "_from_float")) or kind == "literal_error"):
        return f"expected {expected}, got {value!r} ({type(value).__name__})"
    return f"{str(e['msg']).lower()} (got {value!r})"


def _submodel(schema: type[BaseModel], path: list[Any]) -> type[BaseModel] | None:
    model: Any = schema
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = _model_in(fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _allowed_keys(schema: type[BaseModel], path: list[Any]) -> list[str]:
    model = _submodel(schema, path)
    return sorted(model.model_fields) if model is not None else []


def _field_for(schema: type[BaseModel], loc: list[Any]) -> Any:
    model = _submodel(schema, loc[:-1]) if loc else None
    return model.model_fields.get(str(loc[-1])) if model is not None else None


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "a mapping",
    list: "a list",
}


def _expected(ann: Any) -> str | None:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in args)
    if origin in (typing.Union, types.UnionType):
        words = [_expected(a) for a in args if a is not type(None)]
        if not all(words):
            return None
        return " or ".join(words) + (" or null" if type(None) in args else "")  # type: ignore[arg-type]
    return _TYPE_WORDS.get(origin or ann)
