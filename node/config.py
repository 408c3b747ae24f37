"""The node's one configuration object: a TOML file merged over defaults, then
``PTX_NODE_``-prefixed environment overrides, validated into typed models that
reject unknown keys.

Environment overrides use ``__`` to descend into sections, e.g.
``PTX_NODE_SCP__PORT=11113`` or ``PTX_NODE_DATABASE_URL=postgresql+psycopg://...``.
Values follow pydantic-settings' rules: a text field takes the value as it is (so
``PTX_NODE_HTTP__TOKEN=12345678`` is a string), numbers and booleans are parsed from
it, and a list or table is given as JSON (``PTX_NODE_SCP__ALLOWED_CALLERS='[{"ae_title":
"ORTHANC", "host": "10.0.0.5"}]'``). ``PTX_NODE_CONFIG`` names the config file and is the
only ``PTX_NODE_`` variable that is not a setting; any other unknown ``PTX_NODE_`` name is
an error that names the variable.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
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
    "DiskOptions",
    "HttpOptions",
    "ModelOptions",
    "NodeConfig",
    "RetentionOptions",
    "ScpOptions",
    "TlsOptions",
    "WorkerOptions",
    "load_config",
    "write_config_file",
]

ENV_PREFIX = "PTX_NODE_"
# Names the config file itself (set by the CLI for child workers); not an override.
CONFIG_FILE_ENV = "PTX_NODE_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")
# Sections the node and its workers must agree on (see NodeConfig.shared_settings_digest).
SHARED_SETTINGS = ("delivery", "outputs", "destinations")


# 4608 x 4608 pixels at 16 bits (4300 x 4300 detectors with room to spare)
DEFAULT_MAX_DECODED_BYTES = 4608 * 4608 * 2


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


class TlsOptions(_Strict):
    """DICOM over TLS (PS3.15 B.1, BCP 195): PEM files, TLS 1.2 or newer only."""

    enabled: bool = False
    # This side's certificate (chain) and unencrypted private key: required for the SCP,
    # and for an SCU whose destination asks for a client certificate.
    certificate: Path | None = None
    private_key: Path | None = None
    # CAs that sign the peer's certificate (default for an SCU: the system's CAs).
    ca_bundle: Path | None = None
    # SCP only: callers must present a certificate signed by ca_bundle (mutual TLS).
    require_client_certificate: bool = False
    # SCU only: the destination's certificate must name its host.
    check_hostname: bool = True
    min_version: Literal["1.2", "1.3"] = "1.2"


class ScpOptions(_Strict):
    ae_title: str = "PTXNODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    # Empty list: any caller may associate (refused on a non-loopback address unless
    # accept_any_caller is set).
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    accept_any_caller: bool = False
    tls: TlsOptions = Field(default_factory=TlsOptions)
    max_associations: int = Field(10, ge=1)
    # Refuse associations addressed to another AE title (Orthanc's DicomCheckCalledAet); off by
    # default, as in Orthanc: many PACS are configured with a stale title for a working peer.
    check_called_ae_title: bool = False
    # Smaller images are not radiographs worth segmenting (icons, test patterns).
    min_image_size: int = Field(256, ge=1)
    # Larger images are SKIPPED before decoding, so a small compressed file cannot make a
    # worker allocate gigabytes; the default holds the largest detectors (43 cm at 100 um).
    max_decoded_bytes: int = Field(DEFAULT_MAX_DECODED_BYTES, ge=1)

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
    # DIMSE destinations: DICOM TLS to this peer.
    tls: TlsOptions = Field(default_factory=TlsOptions)

    def model_post_init(self, __context: Any) -> None:
        if self.kind == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) in (None, "")]
            if missing:
                raise ValueError(f"destination {self.name!r}: DIMSE destination needs {', '.join(missing)}")
            _check_ae_title(self.ae_title or "")
        elif not self.url:
            raise ValueError(f"destination {self.name!r}: STOW-RS destination needs url")


class DeliveryOptions(_Strict):
    # A destination that keeps failing is retried this long (a PACS maintenance window
    # is often an hour) before the delivery, and its job, end FAILED.
    retry_window_s: float = Field(3600.0, ge=0)
    # Optional cap on tries per object and destination; None: only the window counts.
    max_attempts: int | None = Field(None, ge=1)
    backoff_initial_s: float = Field(5.0, ge=0)
    backoff_max_s: float = Field(180.0, ge=0)
    # C-ECHO / HTTP probe of destinations with waiting deliveries; one that answers
    # again gets them at once. 0 turns probing off.
    probe_interval_s: float = Field(15.0, ge=0)
    calling_ae_title: str = "PTXNODE"
    timeout_s: float = Field(30.0, gt=0)

    _ae = field_validator("calling_ae_title")(_check_ae_title)

    def backoff_s(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): doubles, capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * (2 ** max(0, attempt - 1)))

    def gives_up(self, attempts: int, failing_for_s: float) -> bool:
        """Whether a delivery that failed ``attempts`` times, over ``failing_for_s``, ends FAILED."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return True
        return failing_for_s >= self.retry_window_s


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
    # Hard limit on one task (model and delivery): the worker process is killed past it
    # and the job goes back to the queue (soft limit at 90 %: it stops and retries itself).
    task_time_limit_s: float = Field(600.0, gt=0)
    queue: str = "ptx"


MIN_TOKEN_LENGTH = 16


def _check_token(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip():
        raise ValueError("is empty: leave the setting out for no token, or set one of at least "
                         f"{MIN_TOKEN_LENGTH} characters")
    if value != value.strip() or len(value) < MIN_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters without surrounding spaces "
                         "(for example the output of `openssl rand -hex 16`)")
    return value


class HttpOptions(_Strict):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Opens every route: status page, JSON API, metrics and STOW-RS intake.
    token: str | None = None
    # Opens STOW-RS intake only: what a sending PACS is given, so it cannot read the job log.
    stow_token: str | None = None
    stow_intake: bool = True
    # One STOW-RS request (a chest X-ray study is well under 200 MB) and one instance in it.
    max_request_bytes: int = Field(512 << 20, ge=1 << 16)
    max_part_bytes: int = Field(256 << 20, ge=1 << 16)
    max_parts: int = Field(1000, ge=1)
    # Header lines per part and the length of each.
    max_part_header_bytes: int = Field(8192, ge=256)
    max_concurrent_uploads: int = Field(4, ge=1)
    # Longest pause between two pieces of a request body, and longest time for the whole body.
    body_idle_timeout_s: float = Field(30.0, gt=0)
    body_timeout_s: float = Field(600.0, gt=0)

    _tokens = field_validator("token", "stow_token")(_check_token)

    def model_post_init(self, __context: Any) -> None:
        if self.token is not None and self.token == self.stow_token:
            raise ValueError("http.stow_token must differ from http.token (it opens STOW-RS intake only)")


class DiskOptions(_Strict):
    """Intake stops (C-STORE 0xA700, STOW-RS 503) while the spool's filesystem has less
    free than either threshold, so senders keep their images instead of losing them."""

    min_free_mb: float = Field(1024.0, ge=0)
    min_free_percent: float = Field(5.0, ge=0, le=100)
    # Embedded SQLite on the spool's filesystem: intake stops this much earlier, so the
    # database can still record jobs (finishing, failing, skipping) after it stops.
    database_reserve_mb: float = Field(256.0, ge=0)


class RetentionOptions(_Strict):
    """What `ptx-node gc` (and `serve`, every `interval_s`) deletes; None keeps forever."""

    # Spooled inputs and outputs of jobs that finished (DONE, SKIPPED, FAILED) this long ago.
    files_days: float | None = Field(30.0, gt=0)
    # Rows of finished jobs (and their deliveries), and the association log.
    job_rows_days: float | None = Field(365.0, gt=0)
    # Temporary files (.incoming-*, .stow-*) older than this are leftovers of a crash.
    temp_files_s: float = Field(3600.0, gt=0)
    interval_s: float = Field(3600.0, gt=0)
    enabled: bool = True


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
    disk: DiskOptions = Field(default_factory=DiskOptions)
    retention: RetentionOptions = Field(default_factory=RetentionOptions)

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

    def shared_settings_digest(self) -> str:
        """A digest of the settings every worker must share with the node (what is sent where,
        how often it is retried, which outputs are written); workers record it in their row."""
        data = self.model_dump(mode="json", include=set(SHARED_SETTINGS))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked (for `config check`)."""
        data = self.model_dump(mode="json")
        for dest in data["destinations"]:
            for secret in ("password", "token"):
                if dest.get(secret):
                    dest[secret] = "***"
        for secret in ("token", "stow_token"):
            if data["http"].get(secret) is not None:
                data["http"][secret] = "***"
        for key in ("database_url", "broker_url"):
            data[key] = re.sub(r"(//[^:/@]+:)[^@]+@", r"\1***@", data[key])
        return data


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds directly (``X`` or ``X | None``), else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if union else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_structured(annotation: Any) -> bool:
    """Lists, tables and models: given as JSON in the environment."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_structured(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin in (list, dict, tuple, set) or _field_model(annotation) is not None


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Settings from ``PTX_NODE_*`` variables, and which variable set each setting."""
    overrides: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    errors: list[str] = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key == CONFIG_FILE_ENV:
            continue
        raw = environ[key]
        path = tuple(key[len(ENV_PREFIX):].lower().split("__"))
        model: type[BaseModel] = NodeConfig
        annotation: Any = None
        for depth, part in enumerate(path):
            fields = model.model_fields
            if part not in fields:
                known = [ENV_PREFIX + "__".join((*path[:depth], f)).upper() for f in fields]
                wanted = ENV_PREFIX + "__".join(path[: depth + 1]).upper()
                hint = _suggest(wanted, [*known, CONFIG_FILE_ENV])
                errors.append(f"{key}: unknown setting `{'.'.join(path[: depth + 1])}`{hint}")
                break
            annotation = fields[part].annotation
            if depth < len(path) - 1:
                sub = _field_model(annotation)
                if sub is None:
                    errors.append(f"{key}: `{'.'.join(path[: depth + 1])}` has no sub-settings; "
                                  f"set {ENV_PREFIX}{'__'.join(path[: depth + 1]).upper()} (lists as JSON)")
                    break
                model = sub
        else:
            value: Any = raw
            if _is_structured(annotation):
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as exc:
                    errors.append(f"{key}: lists and tables are given as JSON, e.g. "
                                  f"'[{{\"ae_title\": \"ORTHANC\"}}]'; this is not valid JSON ({exc.msg})")
                    continue
            node = overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
            sources[path] = key
    if errors:
        raise ConfigError("\n".join(errors))
    return overrides, sources


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
    from_env, env_sources = _env_overrides(os.environ if environ is None else environ)
    data = _merge(data, from_env)
    if overrides:
        data = _merge(data, overrides)
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path is not None else "built-in defaults"
        raise ConfigError("\n".join(_describe_error(err, where, env_sources) for err in exc.errors())) from None
    return _resolve_paths(config, base_dir)


def _describe_error(err: Mapping[str, Any], where: str, env_sources: Mapping[tuple[str, ...], str]) -> str:
    """One line per problem, against the variable or the file that set the value."""
    loc = tuple(str(p) for p in err["loc"])
    source = where
    for length in range(len(loc), 0, -1):
        if loc[:length] in env_sources:
            source = env_sources[loc[:length]]
            break
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] | None = NodeConfig
        for part in loc[:-1]:
            if model is None or part.isdigit():
                continue
            field = model.model_fields.get(part)
            annotation = field.annotation if field else None
            model = _field_model(annotation) or _field_model(next(iter(typing.get_args(annotation)), None))
        hint = _suggest(loc[-1], list(model.model_fields)) if model else ""
        return f"{source}: {dotted}: unknown key `{loc[-1]}`{hint}"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{source}: {dotted}: {message}" if dotted else f"{source}: {message}"


def _resolve_paths(config: NodeConfig, base_dir: Path) -> NodeConfig:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base_dir / p)

    def sqlite_absolute(url: str) -> str:
        m = re.match(r"^((?:sqla\+)?sqlite:///)(?!/)(.+)$", url)
        return f"{m.group(1)}{absolute(Path(m.group(2)))}" if m and m.group(2) != ":memory:" else url

    def tls_absolute(tls: TlsOptions) -> TlsOptions:
        files = ("certificate", "private_key", "ca_bundle")
        return tls.model_copy(update={k: absolute(getattr(tls, k)) for k in files if getattr(tls, k) is not None})

    model = config.model
    if model.checkpoint is not None:
        model = model.model_copy(update={"checkpoint": absolute(model.checkpoint)})
    return config.model_copy(
        update={
            "spool_dir": absolute(config.spool_dir),
            "database_url": sqlite_absolute(config.database_url),
            "broker_url": sqlite_absolute(config.broker_url),
            "model": model,
            "scp": config.scp.model_copy(update={"tls": tls_absolute(config.scp.tls)}),
            "destinations": [d.model_copy(update={"tls": tls_absolute(d.tls)}) for d in config.destinations],
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


def is_loopback_address(address: str) -> bool:
    """True for ``localhost`` and any loopback IP (127.0.0.0/8, ::1): a listener only this
    machine can reach. Anything else, names included, counts as reachable from the network."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
