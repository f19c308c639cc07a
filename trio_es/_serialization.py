"""Turn events, entities and metadata into JSON text and back, by registered name and version.

A :class:`Transcoder` is what a serializing store (SQLite, PostgreSQL, your own) uses to
keep Python objects as text. Types are registered under a stable *name* and a *version*;
the stored row keeps both, so a class can be renamed or moved freely, and a changed
payload shape is handled by *upcasters* that rewrite old JSON into the current shape.

Nothing here ever unpickles or imports: decoding only builds instances of classes that
were registered, from plain JSON values, so opening a database cannot run its code.

Structuring and unstructuring are done by a cattrs converter (one per transcoder), so
attrs classes and dataclasses work as they are, nested ones too, with enums, datetimes
(ISO 8601), tuples, frozensets, ``uuid.UUID`` and ``decimal.Decimal`` (as strings).
Primitive fields are checked strictly on decode (``1.5`` is not an ``int``, ``"3"`` is
not an ``int``): a stored payload that does not fit is an error, never silently coerced.

Thread safety: encode and decode may run in worker threads, concurrently. Registration
mutates the transcoder and must be finished before the first store uses it.
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Final, Literal, final

import attrs
import cattrs
from cattrs.preconf.json import make_converter

from ._errors import EventStoreError
from ._types import Metadata
from ._validated import positive_int

__all__ = [
    "EncodedEntity",
    "EncodedEvent",
    "Transcoder",
    "Upcaster",
    "default_converter",
]

logger: Final = logging.getLogger("trio_es.serialization")

#: Rewrites a stored payload (the decoded JSON value) from one version to the next.
Upcaster = Callable[[Any], Any]

_Kind = Literal["event", "entity"]
# How long a value may be when shown in an error message; ids can be 10 kB.
_SHOWN_CHARS: Final = 80


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


@final
@attrs.frozen
class EncodedEvent:
    """An event as a store keeps it: its registered name, version, and JSON payload."""

    event_type: str
    event_version: int
    payload: str


@final
@attrs.frozen
class EncodedEntity:
    """An entity (a snapshot's state) as a store keeps it: name, version, JSON payload."""

    entity_type: str
    entity_version: int
    payload: str


# Strict primitives: cattrs' defaults call int()/str()/float() and would turn a stored
# 1.5 into 1 or "3" into 3. Data written by the transcoder never needs that, so anything
# that does not fit exactly is a corrupt or foreign payload and must be reported.


def _structure_int(value: object, _: object) -> int:
    if type(value) is int:
        return value
    raise TypeError(f"expected an int, got {_show(value)}")


def _structure_float(value: object, _: object) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise TypeError(f"expected a number, got {_show(value)}")


def _structure_str(value: object, _: object) -> str:
    if type(value) is str:
        return value
    raise TypeError(f"expected a string, got {_show(value)}")


def _structure_bool(value: object, _: object) -> bool:
    if type(value) is bool:
        return value
    raise TypeError(f"expected true or false, got {_show(value)}")


def _structure_uuid(value: object, _: object) -> uuid.UUID:
    if type(value) is str:
        return uuid.UUID(value)
    raise TypeError(f"expected a UUID string, got {_show(value)}")


def _structure_decimal(value: object, _: object) -> decimal.Decimal:
    # Decimals are stored as strings: JSON numbers would round-trip through float.
    if type(value) is str:
        try:
            return decimal.Decimal(value)
        except decimal.InvalidOperation:
            raise ValueError(f"expected a decimal string, got {_show(value)}") from None
    raise TypeError(f"expected a decimal string, got {_show(value)}")


def default_converter() -> cattrs.Converter:
    """The converter a :class:`Transcoder` uses unless it is given one.

    cattrs' JSON preset (datetimes as ISO 8601, sets and tuples as lists, enums by value)
    plus ``uuid.UUID`` and ``decimal.Decimal`` as strings and strict primitives. Start
    from it to register hooks of your own, then pass it as ``Transcoder(converter=...)``.
    """
    converter = make_converter()
    for cls, hook in (
        (int, _structure_int),
        (float, _structure_float),
        (str, _structure_str),
        (bool, _structure_bool),
        (uuid.UUID, _structure_uuid),
        (decimal.Decimal, _structure_decimal),
    ):
        converter.register_structure_hook(cls, hook)
    converter.register_unstructure_hook(uuid.UUID, str)
    converter.register_unstructure_hook(decimal.Decimal, str)
    return converter


#: Compact, strict JSON (no NaN/Infinity, which PostgreSQL's json types refuse).
#: ensure_ascii=False keeps non-Latin text readable and small. Built once: ``json.dumps``
#: with options builds an encoder on every call, and this runs once per event.
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _dumps(value: object) -> str:
    # The check below refuses lone surrogates, which no database's UTF-8 text can hold.
    text = _ENCODE(value)
    if not text.isascii():
        text.encode("utf-8")
    return text


@attrs.define(eq=False)
class _Registration:
    """One registered class; its cattrs hooks are looked up on first use, then kept."""

    cls: type[Any]
    name: str
    version: int
    #: Attrs classes and dataclasses are stored as JSON objects; a payload that is not
    #: one cannot fit, and saying so beats cattrs' message about a missing field.
    is_object: bool
    unstructure: Callable[[Any], Any] | None = None
    structure: Callable[[Any, Any], Any] | None = None


@attrs.define(eq=False)
class _Registry:
    """The classes of one kind (events or entities) and their upcasters."""

    kind: _Kind
    register_hint: str
    upcaster_hint: str
    by_name: dict[str, _Registration] = attrs.Factory(dict)
    by_class: dict[type[Any], _Registration] = attrs.Factory(dict)
    upcasters: dict[tuple[str, int], Upcaster] = attrs.Factory(dict)
    #: (name, stored version) -> payload -> object; cleared on every registration.
    decoders: dict[tuple[str, int], Callable[[Any], Any]] = attrs.Factory(dict)

    def register(self, cls: type[Any], name: str | None, version: int) -> None:
        if not isinstance(cls, type):
            raise TypeError(f"register a class as an {self.kind} type (got {_show(cls)})")
        name = cls.__qualname__ if name is None else name
        if not isinstance(name, str) or not name:
            raise ValueError(f"an {self.kind} name must be a non-empty str (got {_show(name)})")
        version = positive_int("version", version)
        known = self.by_name.get(name)
        if known is not None and known.cls is not cls:
            raise ValueError(
                f"{self.kind} name {name!r} is already registered for "
                f"{known.cls.__qualname__}; register {cls.__qualname__} under another name"
            )
        known = self.by_class.get(cls)
        if known is not None and (known.name, known.version) != (name, version):
            raise ValueError(
                f"{cls.__qualname__} is already registered as {self.kind} {known.name!r} "
                f"version {known.version}; register each class once"
            )
        if known is not None:
            return
        is_object = attrs.has(cls) or dataclasses.is_dataclass(cls)
        registration = _Registration(cls, name, version, is_object)
        self.by_name[name] = registration
        self.by_class[cls] = registration
        self.decoders.clear()

    def prepare(self, converter: cattrs.Converter) -> None:
        """Look up the cattrs hooks of every registered class now, not on first use.

        A class cattrs cannot handle is left for its first use, which reports it with
        the payload and the fix.
        """
        for registration in self.by_class.values():
            try:
                if registration.structure is None:
                    registration.structure = converter.get_structure_hook(registration.cls)
                if registration.unstructure is None:
                    registration.unstructure = converter.get_unstructure_hook(registration.cls)
            except Exception:  # reported on first use, where the message can say more
                continue

    def register_upcaster(self, name: str, from_version: int, fn: Upcaster) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"an {self.kind} name must be a non-empty str (got {_show(name)})")
        from_version = positive_int("from_version", from_version)
        if not callable(fn):
            raise TypeError(f"an upcaster must be callable (got {_show(fn)})")
        key = (name, from_version)
        if key in self.upcasters:
            raise ValueError(
                f"an upcaster for {self.kind} {name!r} from version {from_version} is "
                "already registered; register one upcaster per version step"
            )
        self.upcasters[key] = fn
        self.decoders.clear()

    def decoder(self, name: str, version: int, converter: cattrs.Converter) -> Callable[[Any], Any]:
        """Return ``payload -> object`` for a stored (name, version), upcasting as needed.

        Raises:
            _Undecodable: the type is unknown, or no upcaster chain reaches its version.
        """
        cached = self.decoders.get((name, version))
        if cached is not None:
            return cached
        registration = self.by_name.get(name)
        if registration is None:
            raise _Undecodable(f"the {self.kind} type is not registered", self.register_hint)
        if version > registration.version:
            raise _Undecodable(
                f"it was written as version {version} but {registration.cls.__qualname__} "
                f"is registered as version {registration.version}",
                "run the application version that wrote it, or register the newer version",
            )
        steps: list[Upcaster] = []
        for step in range(version, registration.version):
            upcaster = self.upcasters.get((name, step))
            if upcaster is None:
                raise _Undecodable(
                    f"no upcaster from version {step} to {step + 1} is registered",
                    self.upcaster_hint.format(name=name, version=step),
                )
            steps.append(upcaster)
        structure = registration.structure
        if structure is None:
            structure = registration.structure = converter.get_structure_hook(registration.cls)
        cls = registration.cls
        is_object = registration.is_object

        def decode(payload: Any) -> Any:
            for upcast in steps:
                try:
                    payload = upcast(payload)
                except Exception as error:
                    raise _Undecodable(
                        f"its upcaster failed ({type(error).__name__}: {error})",
                        "fix the upcaster",
                    ) from error
            if is_object and not isinstance(payload, dict):
                raise _Undecodable(
                    f"the payload is not a JSON object but {_show(payload)}",
                    "fix the stored row or register an upcaster",
                )
            return structure(payload, cls)

        self.decoders[(name, version)] = decode
        return decode

    def encoder(self, obj: object, converter: cattrs.Converter) -> _Registration:
        registration = self.by_class.get(type(obj))
        if registration is None:
            raise _Undecodable(
                f"its class {type(obj).__qualname__} is not registered", self.register_hint
            )
        if registration.unstructure is None:
            registration.unstructure = converter.get_unstructure_hook(registration.cls)
        return registration


class _Undecodable(Exception):
    """Internal: why a payload cannot be (de)coded, and the fix; callers add the context."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason, fix)
        self.reason = reason
        self.fix = fix


def _encode_fix(error: BaseException) -> str:
    if isinstance(error, UnicodeEncodeError):
        return "use valid Unicode text (no lone surrogates)"
    if isinstance(error, ValueError) and "JSON compliant" in str(error):
        return "use finite numbers (JSON has no NaN or infinity)"
    return "register a cattrs hook for the value's type on Transcoder.converter"


def _describe(error: BaseException) -> str:
    if isinstance(error, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(error))
    return f"{type(error).__name__}: {error}"


@final
@attrs.define(eq=False)
class Transcoder:
    """Encodes events, entities and metadata as JSON text and decodes them back.

    Register every event class and (for snapshots) the entity class before opening a
    store::

        transcoder = Transcoder()
        transcoder.register_event(DepositedMoney)                  # name "DepositedMoney", v1
        transcoder.register_event(WithdrewMoney, name="Withdrew", version=2)
        transcoder.register_upcaster("Withdrew", from_version=1, fn=lambda d: {**d, "fee": 0})
        transcoder.register_entity(BankAccount)

    Args:
        converter: the cattrs converter to use; :func:`default_converter` if omitted.
            Register custom hooks on it before the first encode or decode, and before
            a store opens with this transcoder (see :meth:`prepare`): the hooks of each
            registered class are looked up once and then kept.
    """

    _converter: cattrs.Converter = attrs.field(factory=default_converter, alias="converter")
    _events: _Registry = attrs.field(init=False)
    _entities: _Registry = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._events = _Registry(
            "event",
            "register it with Transcoder.register_event",
            "register one with Transcoder.register_upcaster({name!r}, from_version={version}, "
            "fn=...)",
        )
        self._entities = _Registry(
            "entity",
            "register it with Transcoder.register_entity",
            "register one with Transcoder.register_entity_upcaster({name!r}, "
            "from_version={version}, fn=...)",
        )

    @property
    def converter(self) -> cattrs.Converter:
        """The cattrs converter used for every payload."""
        return self._converter

    def register_event(self, cls: type[Any], *, name: str | None = None, version: int = 1) -> None:
        """Encode instances of ``cls`` as ``name`` (default ``cls.__qualname__``), ``version``.

        The name is what the database keeps, so choose one that will not change when the
        class is renamed. Registering the same class again with the same name and version
        does nothing.

        Raises:
            ValueError: ``name`` already belongs to another class, or ``cls`` is already
                registered under another name or version.
            TypeError, NonPositiveArgument: ``cls`` is not a class or ``version`` is not a
                positive int.
        """
        self._events.register(cls, name, version)

    def register_entity(self, cls: type[Any], *, name: str | None = None, version: int = 1) -> None:
        """Like :meth:`register_event`, for the entity class that snapshots store."""
        self._entities.register(cls, name, version)

    def prepare(self) -> None:
        """Build the cattrs hooks of every registered class now, instead of on first use.

        cattrs generates each class's (un)structuring code the first time it is needed,
        which costs about a millisecond per class: without this, the first command or
        load of each kind pays it. The SQL stores call this when they open, so register
        classes and custom hooks before opening a store. Classes registered later are
        prepared on first use, as before.
        """
        self._events.prepare(self._converter)
        self._entities.prepare(self._converter)

    def register_upcaster(self, name: str, *, from_version: int, fn: Upcaster) -> None:
        """Rewrite stored payloads of event ``name`` from ``from_version`` to ``from_version + 1``.

        ``fn`` takes and returns the decoded JSON value (usually a ``dict``). Decoding
        chains upcasters from the stored version up to the registered one, so a v1 event
        read by an application that registered v3 goes through the 1->2 and 2->3 steps.
        Upcasters and classes can be registered in any order.

        Raises:
            ValueError: an upcaster for this name and version is already registered.
        """
        self._events.register_upcaster(name, from_version, fn)

    def register_entity_upcaster(self, name: str, *, from_version: int, fn: Upcaster) -> None:
        """Like :meth:`register_upcaster`, for snapshot payloads of entity ``name``."""
        self._entities.register_upcaster(name, from_version, fn)

    def encode_event(
        self, event: object, *, aggregate_id: str | None = None, sequence: int | None = None
    ) -> EncodedEvent:
        """Encode ``event``; ``aggregate_id`` and ``sequence`` only improve error messages.

        Raises:
            EventStoreError: the event's class is not registered, or a value in it cannot
                be represented as JSON.
        """
        try:
            registration = self._events.encoder(event, self._converter)
            assert registration.unstructure is not None
            payload = _dumps(registration.unstructure(event))
        except _Undecodable as error:
            raise EventStoreError(
                f"cannot encode event {_show(event)}{_at(sequence)}: {error.reason}; {error.fix}",
                aggregate_id=aggregate_id,
            ) from None
        except Exception as error:
            raise EventStoreError(
                f"cannot encode event {_show(event)}{_at(sequence)} as JSON "
                f"({_describe(error)}); {_encode_fix(error)}",
                aggregate_id=aggregate_id,
            ) from error
        return EncodedEvent(registration.name, registration.version, payload)

    def decode_event(
        self,
        event_type: str,
        event_version: int,
        payload: str,
        *,
        aggregate_id: str,
        sequence: int,
    ) -> Any:
        """Decode a stored event, upcasting it to the registered version first.

        Raises:
            EventStoreError: the type is unknown, no upcaster chain reaches the registered
                version, or the payload is not valid JSON of the expected shape. The
                message names the type, version and sequence; ``aggregate_id`` is set.
        """
        try:
            decode = self._events.decoder(event_type, event_version, self._converter)
            return decode(json.loads(payload))
        except _Undecodable as error:
            reason, fix, cause = error.reason, error.fix, error.__cause__
        except json.JSONDecodeError as error:
            reason, fix, cause = (
                f"the payload is not valid JSON ({error})",
                "fix the stored row",
                error,
            )
        except Exception as error:
            reason, fix, cause = (
                f"the payload does not fit ({_describe(error)})",
                "fix the stored row or register an upcaster with Transcoder.register_upcaster",
                error,
            )
        raise EventStoreError(
            f"cannot decode event {_show(event_type)} version {event_version} at sequence "
            f"{sequence}: {reason}; {fix}",
            aggregate_id=aggregate_id,
        ) from cause

    def encode_entity(self, entity: object, *, aggregate_id: str | None = None) -> EncodedEntity:
        """Encode a snapshot's entity.

        Raises:
            EventStoreError: the entity's class is not registered or does not fit JSON.
        """
        try:
            registration = self._entities.encoder(entity, self._converter)
            assert registration.unstructure is not None
            payload = _dumps(registration.unstructure(entity))
        except _Undecodable as error:
            raise EventStoreError(
                f"cannot encode the snapshot entity {_show(entity)}: {error.reason}; {error.fix}",
                aggregate_id=aggregate_id,
            ) from None
        except Exception as error:
            raise EventStoreError(
                f"cannot encode the snapshot entity {_show(entity)} as JSON "
                f"({_describe(error)}); {_encode_fix(error)}",
                aggregate_id=aggregate_id,
            ) from error
        return EncodedEntity(registration.name, registration.version, payload)

    def decode_entity(
        self, entity_type: str, entity_version: int, payload: str, *, aggregate_id: str
    ) -> Any | None:
        """Decode a snapshot's entity, or return ``None`` (and log why) when it cannot be.

        A snapshot is derived data: the events alone rebuild the entity. So an unknown
        type, an old version without an upcaster chain, a newer version or a payload
        that does not fit never fails a load; the snapshot is ignored with a warning on
        the ``trio_es.serialization`` logger.
        """
        try:
            decode = self._entities.decoder(entity_type, entity_version, self._converter)
            return decode(json.loads(payload))
        except _Undecodable as error:
            reason = f"{error.reason}; {error.fix}"
        except Exception as error:
            reason = f"the payload does not fit ({_describe(error)})"
        logger.warning(
            "ignoring the snapshot of aggregate %s (entity %s version %s): %s; the entity "
            "is rebuilt from its events",
            _show(aggregate_id),
            _show(entity_type),
            entity_version,
            reason,
        )
        return None

    def encode_metadata(self, metadata: Metadata) -> str:
        """Encode metadata as a JSON list of ``[key, value]`` pairs (order and repeats kept).

        Raises:
            EventStoreError: ``metadata`` is not a sequence of ``(str, str)`` pairs.
        """
        if not metadata:
            return "[]"
        try:
            pairs = [[key, value] for key, value in metadata]
            if not all(type(k) is str and type(v) is str for k, v in pairs):
                raise TypeError("a key or value is not a str")
            return _dumps(pairs)
        except (TypeError, ValueError) as error:
            raise EventStoreError(
                f"cannot encode metadata {_show(metadata)} ({error}); pass (str, str) pairs"
            ) from error

    def decode_metadata(
        self, text: str, *, aggregate_id: str | None = None, sequence: int | None = None
    ) -> Metadata:
        """Decode metadata stored by :meth:`encode_metadata`.

        Raises:
            EventStoreError: ``text`` is not a JSON list of ``[str, str]`` pairs.
        """
        if text == "[]":
            return ()
        try:
            value = json.loads(text)
            if isinstance(value, list) and all(
                isinstance(pair, list)
                and len(pair) == 2
                and type(pair[0]) is str
                and type(pair[1]) is str
                for pair in value
            ):
                return tuple((key, val) for key, val in value)
        except (TypeError, ValueError):
            pass
        raise EventStoreError(
            f"cannot decode the metadata{_at(sequence)}: {_show(text)} is not a JSON list of "
            "[key, value] string pairs; fix the stored row",
            aggregate_id=aggregate_id,
        )


def _at(sequence: int | None) -> str:
    return "" if sequence is None else f" at sequence {sequence}"
