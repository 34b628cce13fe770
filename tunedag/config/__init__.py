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

from tunedag.config import axolotl
from tunedag.config.checks import (PLAIN_NAME_RULE, check_across_runs, check_cluster, check_model_fits,
                                   check_run, is_plain_name, time_minutes)
from tunedag.config.fields import (STAGES, ClusterResources, Config, ConfigError, DatasetConfig, Problems,
                                   RunConfig, hash_json, plain)

__all__ = ["STAGES", "ClusterResources", "Config", "ConfigError", "DatasetConfig", "RunConfig", "check_model_fits",
           "effective_config", "hash_json", "is_plain_name", "json_schema", "load_config", "load_run", "load_yaml",
           "parse_config", "time_minutes"]


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
        problems, items = Problems(), []
        for i, v in enumerate(value):
            with problems.check():
                items.append(_coerce(v, inner, f"{where}[{i}]"))
        problems.raise_if_any()
        return items
    if origin is dict:  # string keys
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        value_tp = typing.get_args(tp)[1]
        return {_coerce(k, str, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp in (int, float) and isinstance(value, str):
        value = _number(value, tp, where)
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


def _number(text: str, tp: type, where: str) -> Any:
    """A number written as a string (YAML reads ``2e-5`` as one): the number, as Axolotl takes it."""
    try:
        return int(text) if tp is int else float(text)
    except ValueError:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {text!r} (a string that is not one)") from None


def _build(cls: type, raw: Any, where: str) -> Any:
    """``cls`` from a mapping; every unknown key, bad value and missing key is reported at once.
    A key set to null is unset (its default), unless null is one of its values."""
    built, problems, _ = _build_lenient(cls, raw, where)
    if problems:
        raise ConfigError(*problems)
    return built


def _build_lenient(cls: type, raw: Any, where: str) -> tuple[Any, list[str], set[str]]:
    """``cls`` built from the keys that pass (a failing key keeps its default; None when a required key
    fails), the problems found, and the keys that failed."""
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a mapping, got {raw!r} ({type(raw).__name__})"], set()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = Problems()
    problems.found += [f"{where}: unknown key {key!r}{_closest(str(key), fields)}" for key in raw if key not in fields]
    kwargs, failed = {}, set()
    for name, f in fields.items():
        value = raw.get(name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if value is None and not _takes_null(hints[name]):
            if required:
                problems.found.append(f"{where}: missing required key {name!r} ({f.metadata['doc']})")
                failed.add(name)
        elif name in raw:
            before = len(problems.found)
            with problems.check():
                kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
            if len(problems.found) > before:
                failed.add(name)
    complete = all(name in kwargs for name, f in fields.items()
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return (cls(**kwargs) if complete else None), problems.found, failed


def _takes_null(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


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
    runs, notes, problems = {}, {}, Problems()
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = [k for k in defaults if k not in run_keys and k not in axolotl.AXOLOTL_ONLY]
    problems.found += [f"{source}: defaults: unknown key {k!r}{_closest(str(k), run_keys)}" for k in unknown]
    defaults = {k: v for k, v in defaults.items() if k not in unknown}
    for name, run_raw in runs_raw.items():
        with problems.check():
            if not is_plain_name(str(name)):
                raise ConfigError(f"{source}: runs: the run name {str(name)!r} is not {PLAIN_NAME_RULE}; "
                                  f"it names the folders data/packed/<run> and runs/<run>")
            where = f"{source}: runs.{name}"
            if run_raw is not None and not isinstance(run_raw, dict):
                raise ConfigError(f"{where}: expected a mapping of keys, got {run_raw!r}")
            from_file, file_notes = axolotl.read_file(run_raw or {}, where, base_dir, load_yaml)
            merged = {**defaults, **from_file}
            if axolotl.is_axolotl_run(merged):
                merged, run_notes, refused = axolotl.translate(merged, where, base_dir)
                notes[str(name)] = file_notes + run_notes
                problems.found += refused
            run, typing_problems, failed = _build_lenient(RunConfig, merged, where)
            problems.found += typing_problems
            if run is not None:  # the value checks too, but none on a key that failed already
                try:
                    check_run(run, where, base_dir)
                except ConfigError as err:
                    problems.found += [p for p in err.problems
                                       if not any(p.startswith(f"{where}.{key}") for key in failed)]
                if not typing_problems:
                    runs[str(name)] = run
    if len(runs) == len(runs_raw):
        with problems.check():
            check_across_runs(runs, source)
    cluster_raw = raw.get("cluster") or {}
    cluster = {}
    with problems.check():
        if not isinstance(cluster_raw, dict):
            raise ConfigError(f"{source}: cluster: expected a mapping of stage names to resources")
        for stage, res in cluster_raw.items():
            with problems.check():
                if stage not in STAGES:
                    raise ConfigError(f"{source}: cluster: unknown stage {stage!r}{_closest(str(stage), STAGES)}")
                cluster[stage] = _build(ClusterResources, res, f"{source}: cluster.{stage}")
                check_cluster(cluster[stage], f"{source}: cluster.{stage}")
    problems.raise_if_any()
    return Config(runs=runs, cluster=cluster, notes=notes)


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


def effective_config(config: Config) -> str:
    """The config as tunedag runs it, as YAML: every key of every run with its value (defaults merged,
    Axolotl keys translated), each run's notes as comments above it. The stages read this file."""
    lines = ["# The effective tunedag config: every key as the stages read it (see README, \"Config keys\")."]
    runs = {name: plain(run) for name, run in config.runs.items()}
    cluster = {stage: plain(res) for stage, res in config.cluster.items()}
    lines.append("runs:")
    for name, run in runs.items():
        lines += [f"  # {note}" for note in config.notes.get(name, [])]
        body = yaml.safe_dump({name: run}, sort_keys=False, default_flow_style=False, allow_unicode=True)
        lines += ["  " + line for line in body.splitlines()]
    if cluster:
        lines += yaml.safe_dump({"cluster": cluster}, sort_keys=False).splitlines()
    return "\n".join(lines) + "\n"


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
