"""The run configuration: typed, validated before any job starts, hashed per stage.

config.yaml holds ``defaults`` (shared by every run), ``runs`` (one entry per run; a sweep is
several runs) and ``cluster`` (Slurm resources per stage). Key names follow Axolotl's wherever
the meaning is the same. Each field records which stages read it, so that a stage's outputs
carry the hash of exactly the keys that made them and a changed key reruns only the stages
that read it.

The package: :mod:`tunedag.config.fields` holds the typed keys, :mod:`tunedag.config.checks`
what a value must satisfy beyond its type; this module reads YAML, builds and checks a
``Config`` (``parse_config``, ``load_config``, ``load_run``) and writes the JSON schema
(``python -m tunedag.config``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tunedag.config.checks import (PLAIN_NAME_RULE, check_across_runs, check_cluster, check_model_fits,
                                   check_run, is_plain_name, time_minutes)
from tunedag.config.fields import (STAGES, ClusterResources, Config, ConfigError, DatasetConfig, RunConfig,
                                   hash_json)

__all__ = ["STAGES", "ClusterResources", "Config", "ConfigError", "DatasetConfig", "RunConfig", "check_model_fits",
           "hash_json", "is_plain_name", "json_schema", "load_config", "load_run", "load_yaml", "parse_config",
           "time_minutes"]


# --------------------------------------------------------------------------- validation

def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _closest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # string keys
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        value_tp = typing.get_args(tp)[1]
        return {_coerce(k, str, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r} ({type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r} ({f.metadata['doc']})")
    return cls(**kwargs)


def parse_config(raw: Any, source: str = "config.yaml", base_dir: Path = Path(".")) -> Config:
    """Validate a loaded YAML document; raise ConfigError naming the key and value at fault."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'runs', got {type(raw).__name__}")
    top = ("defaults", "runs", "cluster")
    for key in raw:
        if key not in top:
            raise ConfigError(f"{source}: unknown top-level key {key!r}{_closest(str(key), top)}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: expected a mapping, got {defaults!r}")
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, dict) or not runs_raw:
        raise ConfigError(f"{source}: runs: expected a mapping of run names to settings")
    runs = {}
    for name, run_raw in runs_raw.items():
        if not is_plain_name(str(name)):
            raise ConfigError(f"{source}: runs: the run name {str(name)!r} is not {PLAIN_NAME_RULE}; "
                              f"it names the folders data/packed/<run> and runs/<run>")
        where = f"{source}: runs.{name}"
        merged = {**defaults, **(run_raw or {})}
        for key in defaults:  # name an unknown default key where it was written
            if key not in {f.name for f in dataclasses.fields(RunConfig)}:
                _build(RunConfig, {key: defaults[key]}, f"{source}: defaults")
        run = _build(RunConfig, merged, where)
        check_run(run, where, base_dir)
        runs[str(name)] = run
    check_across_runs(runs, source)
    cluster_raw = raw.get("cluster") or {}
    if not isinstance(cluster_raw, dict):
        raise ConfigError(f"{source}: cluster: expected a mapping of stage names to resources")
    cluster = {}
    for stage, res in cluster_raw.items():
        if stage not in STAGES:
            raise ConfigError(f"{source}: cluster: unknown stage {stage!r}{_closest(str(stage), STAGES)}")
        cluster[stage] = _build(ClusterResources, res, f"{source}: cluster.{stage}")
        check_cluster(cluster[stage], f"{source}: cluster.{stage}")
    return Config(runs=runs, cluster=cluster)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error, not the last one wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; keys written beside it override on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the base loader names it
            if earlier != line:
                raise ConfigError(f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (line {earlier} "
                                  "sets it too, and YAML would keep only the last); remove one")
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's document; ConfigError naming file and line for bad YAML or a duplicate key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_config(path: str | Path) -> Config:
    """Read and validate config.yaml; paths in it are relative to the working directory."""
    return parse_config(load_yaml(path), source=str(path), base_dir=Path("."))


def load_run(config_path: str | Path, run: str) -> tuple[Config, RunConfig]:
    """The whole config and run ``run`` of it; a ConfigError names the runs there are."""
    config = load_config(config_path)
    if run not in config.runs:
        raise ConfigError(f"{config_path}: no run named {run!r}; runs are {', '.join(config.runs)}")
    return config, config.runs[run]


# --------------------------------------------------------------------------- JSON schema

def _schema_of(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return {"anyOf": [_schema_of(inner[0]), {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _schema_of(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(typing.get_args(tp)[1])}
    if dataclasses.is_dataclass(tp):
        return _object_schema(tp)
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}


def _object_schema(cls: type, required: bool = True) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    needed = []
    for f in dataclasses.fields(cls):
        props[f.name] = {**_schema_of(hints[f.name]), "description": f.metadata["doc"]}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            needed.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required and needed:
        schema["required"] = needed
    return schema


def json_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (workflow/schemas/config.schema.json is generated from it)."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "tunedag config.yaml",
        "type": "object",
        "additionalProperties": False,
        "required": ["runs"],
        "properties": {
            "defaults": _object_schema(RunConfig, required=False),
            "runs": {"type": "object", "minProperties": 1,
                     "additionalProperties": {"anyOf": [_object_schema(RunConfig, required=False),
                                                        {"type": "null"}]}},
            "cluster": {"type": "object",
                        "propertyNames": {"enum": list(STAGES)},
                        "additionalProperties": _object_schema(ClusterResources)},
        },
    }
