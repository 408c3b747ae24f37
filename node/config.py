"""The node's one configuration object: a TOML file merged over defaults, then
``PTX_NODE_``-prefixed environment overrides, validated into typed models that
reject unknown keys.

Environment overrides use ``__`` to descend into sections, e.g.
``PTX_NODE_SCP__PORT=11113`` or ``PTX_NODE_DATABASE_URL=postgresql+psycopg://...``.
Values are parsed as TOML literals when they parse (numbers, booleans, arrays),
otherwise taken as strings.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.outputs.options import OutputOptions

__all__ = [
    "AllowedCaller",
    "ConfigError",
    "DeliveryOptions",
    "Destination",
    "HttpOptions",
    "ModelOptions",
    "NodeConfig",
    "ScpOptions",
    "WorkerOptions",
    "load_config",
    "write_config_file",
]

ENV_PREFIX = "PTX_NODE_"
# Names the config file itself (set by the CLI for child workers); not an override.
CONFIG_FILE_ENV = "PTX_NODE_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")


class ConfigError(ValueError):
    """The configuration file or environment holds an invalid value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or "\\" in value or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters, no backslash.")
    return value.strip()


class AllowedCaller(_Strict):
    """A calling AE title allowed to associate, optionally pinned to a host address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class ScpOptions(_Strict):
    ae_title: str = "PTXNODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    # Empty list: any caller may associate.
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    max_associations: int = Field(10, ge=1)
    # Smaller images are not radiographs worth segmenting (icons, test patterns).
    min_image_size: int = Field(256, ge=1)

    _ae = field_validator("ae_title")(_check_ae_title)


class Destination(_Strict):
    """A PACS the node sends its SEG and SC to."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["dimse", "stow"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    # STOW-RS destinations.
    url: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = Field(30.0, gt=0)

    def model_post_init(self, __context: Any) -> None:
        if self.kind == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) in (None, "")]
            if missing:
                raise ValueError(f"destination {self.name!r}: DIMSE destination needs {', '.join(missing)}")
            _check_ae_title(self.ae_title or "")
        elif not self.url:
            raise ValueError(f"destination {self.name!r}: STOW-RS destination needs url")


class DeliveryOptions(_Strict):
    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(5.0, ge=0)
    backoff_max_s: float = Field(300.0, ge=0)
    calling_ae_title: str = "PTXNODE"
    timeout_s: float = Field(30.0, gt=0)

    _ae = field_validator("calling_ae_title")(_check_ae_title)

    def backoff_s(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): doubles, capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * (2 ** max(0, attempt - 1)))


class ModelOptions(_Strict):
    checkpoint: Path | None = None
    allow_untrained: bool = False
    device: Literal["cpu", "cuda", "auto"] = "auto"
    tta: bool = True
    # Network input size when running untrained (a checkpoint carries its own).
    untrained_input_size: int = Field(512, ge=32)


class WorkerOptions(_Strict):
    # Embedded mode: how many worker processes `ptx-node serve` starts (0: none).
    embedded_workers: int = Field(1, ge=0)
    concurrency: int = Field(1, ge=1)
    # A RUNNING job whose worker stopped renewing its lease this long ago is re-queued.
    lease_s: float = Field(120.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    # A RECEIVED/QUEUED job not picked up after this long is enqueued again.
    requeue_after_s: float = Field(60.0, gt=0)
    sweep_interval_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    queue: str = "ptx"


class HttpOptions(_Strict):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str | None = None
    stow_intake: bool = True


class NodeConfig(_Strict):
    """Everything the node needs; defaults are the embedded single-machine mode."""

    spool_dir: Path = Path("var/spool")
    database_url: str = "sqlite:///var/ptx-node.sqlite"
    # Embedded default: Celery over SQLAlchemy/SQLite, a broker that needs no server.
    broker_url: str = "sqla+sqlite:///var/broker.sqlite"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    scp: ScpOptions = Field(default_factory=ScpOptions)
    destinations: list[Destination] = Field(default_factory=list)
    delivery: DeliveryOptions = Field(default_factory=DeliveryOptions)
    model: ModelOptions = Field(default_factory=ModelOptions)
    worker: WorkerOptions = Field(default_factory=WorkerOptions)
    http: HttpOptions = Field(default_factory=HttpOptions)
    outputs: OutputOptions = Field(default_factory=OutputOptions)

    def model_post_init(self, __context: Any) -> None:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(dupes)}")

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(("sqla+", "memory://", "filesystem://"))

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination {name!r}; configured: {', '.join(d.name for d in self.destinations) or 'none'}")

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked (for `config check`)."""
        data = self.model_dump(mode="json")
        for dest in data["destinations"]:
            for secret in ("password", "token"):
                if dest.get(secret):
                    dest[secret] = "***"
        if data["http"].get("token"):
            data["http"]["token"] = "***"
        for key in ("database_url", "broker_url"):
            data[key] = re.sub(r"(//[^:/@]+:)[^@]+@", r"\1***@", data[key])
        return data


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_FILE_ENV:
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw)
    return overrides


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Load the TOML file (if any), apply environment then explicit overrides, validate.

    Relative paths in the file are taken relative to the file's directory.
    """
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
        base_dir = file.resolve().parent
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid configuration{f' in {path}' if path else ''}:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    return _resolve_paths(config, base_dir)


def _resolve_paths(config: NodeConfig, base_dir: Path) -> NodeConfig:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base_dir / p)

    def sqlite_absolute(url: str) -> str:
        m = re.match(r"^((?:sqla\+)?sqlite:///)(?!/)(.+)$", url)
        return f"{m.group(1)}{absolute(Path(m.group(2)))}" if m and m.group(2) != ":memory:" else url

    model = config.model
    if model.checkpoint is not None:
        model = model.model_copy(update={"checkpoint": absolute(model.checkpoint)})
    return config.model_copy(
        update={
            "spool_dir": absolute(config.spool_dir),
            "database_url": sqlite_absolute(config.database_url),
            "broker_url": sqlite_absolute(config.broker_url),
            "model": model,
        }
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def write_config_file(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write plain config data (as `load_config` reads it) as a TOML file: top-level keys,
    then one [table] per section, then [[array]] items such as destinations."""
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    arrays = {k: v for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], Mapping)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if k not in tables and k not in arrays]
    for key, table in tables.items():
        lines += [f"\n[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    for key, items in arrays.items():
        for item in items:
            lines += [f"\n[[{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in item.items())]
    target = Path(path)
    target.write_text("\n".join(lines) + "\n")
    return target
