"""The Transcoder: JSON round trips, registration rules, upcasting and clear decode errors."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import logging
import uuid
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_es import EventStoreError, Metadata, NonPositiveArgument
from trio_es.serialization import EncodedEvent, Transcoder, default_converter

from ._loading import count_hook_lookups


class Currency(enum.Enum):
    """An enum stored by value."""

    EUR = "EUR"
    USD = "USD"


@attrs.frozen
class Money:
    """A nested attrs value."""

    amount: decimal.Decimal
    currency: Currency


@attrs.frozen
class Deposited:
    """An event with nested, enum, datetime, tuple, frozenset, UUID and optional fields."""

    money: Money
    at: datetime.datetime
    tags: tuple[str, ...]
    flags: frozenset[str]
    reference: uuid.UUID
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Renamed:
    """A dataclass event."""

    name: str
    counts: list[int]


@attrs.frozen
class Account:
    """An entity for snapshots."""

    balance: int


@attrs.frozen
class AccountV2:
    """The same entity after a field was renamed."""

    cents: int


def _deposited() -> Deposited:
    return Deposited(
        Money(decimal.Decimal("12.30"), Currency.EUR),
        datetime.datetime(2024, 2, 29, 23, 59, 59, 123456, datetime.UTC),
        ("salary", "ü"),
        frozenset({"a", "b"}),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
    )


@pytest.fixture
def transcoder() -> Transcoder:
    """A transcoder with Deposited, Renamed and Account registered."""
    t = Transcoder()
    t.register_event(Deposited)
    t.register_event(Renamed, name="renamed", version=1)
    t.register_entity(Account)
    return t


def _decode(t: Transcoder, encoded: EncodedEvent) -> Any:
    return t.decode_event(
        encoded.event_type, encoded.event_version, encoded.payload, aggregate_id="acc", sequence=3
    )


# -- round trips --


def test_attrs_event_round_trips(transcoder: Transcoder) -> None:
    """A nested attrs event with enum, Decimal, datetime, tuple, frozenset and UUID round-trips."""
    event = _deposited()
    encoded = transcoder.encode_event(event)
    assert (encoded.event_type, encoded.event_version) == ("Deposited", 1)
    assert json.loads(encoded.payload)["money"] == {"amount": "12.30", "currency": "EUR"}
    assert json.loads(encoded.payload)["at"] == "2024-02-29T23:59:59.123456+00:00"
    assert _decode(transcoder, encoded) == event


def test_dataclass_event_round_trips(transcoder: Transcoder) -> None:
    """A dataclass event round-trips under its registered name."""
    encoded = transcoder.encode_event(Renamed("main", [1, 2]))
    assert encoded == EncodedEvent("renamed", 1, '{"name":"main","counts":[1,2]}')
    assert _decode(transcoder, encoded) == Renamed("main", [1, 2])


def test_non_ascii_text_is_kept_readable(transcoder: Transcoder) -> None:
    """Unicode text is stored as itself, not as escapes."""
    encoded = transcoder.encode_event(Renamed("日本語 🎉", []))
    assert "日本語 🎉" in encoded.payload
    assert _decode(transcoder, encoded) == Renamed("日本語 🎉", [])


@given(
    name=st.text(),
    counts=st.lists(st.integers(min_value=-(2**70), max_value=2**70)),
)
def test_any_text_and_integers_round_trip(name: str, counts: list[int]) -> None:
    """Arbitrary valid text and big integers survive encode then decode."""
    t = Transcoder()
    t.register_event(Renamed)
    try:
        encoded = t.encode_event(Renamed(name, counts))
    except EventStoreError:
        # Only text UTF-8 cannot hold (a lone surrogate) may be refused.
        with pytest.raises(UnicodeEncodeError):
            name.encode("utf-8")
        return
    assert _decode(t, encoded) == Renamed(name, counts)


def test_entity_round_trips(transcoder: Transcoder) -> None:
    """An entity encodes and decodes under its name and version."""
    encoded = transcoder.encode_entity(Account(42))
    assert (encoded.entity_type, encoded.entity_version) == ("Account", 1)
    decoded = transcoder.decode_entity(
        encoded.entity_type, encoded.entity_version, encoded.payload, aggregate_id="acc"
    )
    assert decoded == Account(42)


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("user", "ann"),),
        (("", ""), ("q'uote", 'd"q'), ("dup", "1"), ("dup", "2"), ("u", "日本 🎉"), ("k", "[]")),
    ],
)
def test_metadata_round_trips(transcoder: Transcoder, metadata: Metadata) -> None:
    """Metadata keeps its order, repeats and odd strings."""
    assert transcoder.decode_metadata(transcoder.encode_metadata(metadata)) == metadata


def test_custom_converter_hooks_are_used() -> None:
    """Hooks registered on a converter passed to the Transcoder shape the payload."""
    converter = default_converter()
    converter.register_unstructure_hook(Account, lambda a: {"b": a.balance})
    converter.register_structure_hook(Account, lambda d, _: Account(d["b"]))
    t = Transcoder(converter=converter)
    t.register_event(Account)
    encoded = t.encode_event(Account(5))
    assert encoded.payload == '{"b":5}'
    assert _decode(t, encoded) == Account(5)


# -- registration --


def test_same_name_for_two_classes_is_refused(transcoder: Transcoder) -> None:
    """Registering a second class under a taken name raises ValueError naming both."""
    with pytest.raises(ValueError, match="'Deposited' is already registered for Deposited"):
        transcoder.register_event(Renamed, name="Deposited")


def test_class_registered_twice_differently_is_refused(transcoder: Transcoder) -> None:
    """A class registered again under another name or version raises; the same call is a no-op."""
    transcoder.register_event(Deposited)
    with pytest.raises(ValueError, match="already registered as event 'Deposited' version 1"):
        transcoder.register_event(Deposited, version=2)


def test_bad_registration_arguments(transcoder: Transcoder) -> None:
    """Non-classes, empty names, non-positive versions and duplicate upcasters are refused."""
    with pytest.raises(TypeError, match="register a class"):
        transcoder.register_event(_deposited())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty str"):
        transcoder.register_event(Money, name="")
    with pytest.raises(NonPositiveArgument):
        transcoder.register_event(Money, version=0)
    transcoder.register_upcaster("Deposited", from_version=1, fn=dict)
    with pytest.raises(ValueError, match="already registered"):
        transcoder.register_upcaster("Deposited", from_version=1, fn=dict)
    with pytest.raises(TypeError, match="callable"):
        transcoder.register_upcaster("Deposited", from_version=2, fn=3)  # type: ignore[arg-type]


# -- errors --


def test_unregistered_event_class_names_the_fix(transcoder: Transcoder) -> None:
    """Encoding an unregistered class raises EventStoreError saying to register it."""
    with pytest.raises(
        EventStoreError, match=r"register it with Transcoder\.register_event"
    ) as info:
        transcoder.encode_event(
            Money(decimal.Decimal(1), Currency.USD), aggregate_id="a", sequence=4
        )
    assert "Money" in str(info.value)
    assert "sequence 4" in str(info.value)
    assert info.value.aggregate_id == "a"


@pytest.mark.parametrize(
    ("event_type", "version", "payload", "message"),
    [
        ("Nope", 1, "{}", "'Nope' version 1 at sequence 3: the event type is not registered; "),
        ("renamed", 1, "{not json", "not valid JSON"),
        ("renamed", 1, '{"name": 5, "counts": []}', r"expected str @ \$\.name"),
        ("renamed", 1, '{"name": "x", "counts": [1.5]}', r"expected int @ \$\.counts\[0\]"),
        ("renamed", 1, '{"name": "x", "counts": ["1"]}', r"\$\.counts"),
        ("renamed", 1, '{"name": "x"}', r"required field missing @ \$\.counts"),
        ("renamed", 1, "[1]", "not a JSON object"),
        ("renamed", 1, "gASVCAAAAAAAAACMBHRlc3SULg==", "not valid JSON"),
        ("renamed", 2, "{}", "written as version 2"),
    ],
)
def test_undecodable_payloads_raise_one_clear_error(
    transcoder: Transcoder, event_type: str, version: int, payload: str, message: str
) -> None:
    """Unknown types, bad JSON and wrong shapes raise an error naming type, version, sequence."""
    with pytest.raises(EventStoreError, match=message) as info:
        transcoder.decode_event(event_type, version, payload, aggregate_id="acc-1", sequence=3)
    text = str(info.value)
    assert f"event {event_type!r} version {version} at sequence 3" in text
    assert text.endswith("(aggregate 'acc-1')")
    assert info.value.aggregate_id == "acc-1"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "\ud800", object()])
def test_values_json_cannot_hold_are_refused_on_encode(value: object) -> None:
    """NaN, infinity, lone surrogates and arbitrary objects raise EventStoreError on encode."""
    t = Transcoder()

    @attrs.frozen
    class Loose:
        value: Any

    t.register_event(Loose)
    with pytest.raises(EventStoreError, match="cannot encode event"):
        t.encode_event(Loose(value))


def test_bad_metadata(transcoder: Transcoder) -> None:
    """Metadata that is not (str, str) pairs is refused on encode and on decode."""
    with pytest.raises(EventStoreError, match="pass \\(str, str\\) pairs"):
        transcoder.encode_metadata((("k", 1),))  # type: ignore[arg-type]
    for text in ('{"k": "v"}', "[[1, 2]]", '[["a"]]', "nope"):
        with pytest.raises(EventStoreError, match="metadata at sequence 9"):
            transcoder.decode_metadata(text, aggregate_id="a", sequence=9)


# -- upcasting --


@attrs.frozen
class Withdrawn:
    """Version 3 of an event: v1 had ``sum``, v2 added ``fee``, v3 renamed ``sum`` to ``amount``."""

    amount: int
    fee: int


def _v2_to_v3(payload: dict[str, int]) -> dict[str, int]:
    return {"amount": payload["sum"], "fee": payload["fee"]}


def test_upcasters_chain_to_the_registered_version() -> None:
    """A v1 payload goes through the 1->2 and 2->3 upcasters, registered in any order."""
    t = Transcoder()
    t.register_upcaster("Withdrawn", from_version=2, fn=_v2_to_v3)
    t.register_event(Withdrawn, version=3)
    t.register_upcaster("Withdrawn", from_version=1, fn=lambda d: {**d, "fee": 0})

    def decode(version: int, payload: str) -> Any:
        return t.decode_event("Withdrawn", version, payload, aggregate_id="a", sequence=1)

    assert decode(1, '{"sum": 5}') == Withdrawn(5, 0)
    assert decode(2, '{"sum": 5, "fee": 1}') == Withdrawn(5, 1)
    assert decode(3, '{"amount": 5, "fee": 2}') == Withdrawn(5, 2)
    assert t.encode_event(Withdrawn(1, 0)).event_version == 3


def test_missing_or_failing_upcaster_names_the_fix() -> None:
    """A gap in the upcaster chain, or an upcaster that raises, is a clear EventStoreError."""
    t = Transcoder()
    t.register_event(Withdrawn, version=3)
    t.register_upcaster("Withdrawn", from_version=2, fn=_v2_to_v3)
    with pytest.raises(EventStoreError, match=r"register_upcaster\('Withdrawn', from_version=1"):
        t.decode_event("Withdrawn", 1, '{"sum": 5}', aggregate_id="a", sequence=1)
    with pytest.raises(EventStoreError, match="upcaster failed \\(KeyError"):
        t.decode_event("Withdrawn", 2, '{"amount": 5}', aggregate_id="a", sequence=1)


def test_snapshot_entity_upcasting_and_ignoring(caplog: pytest.LogCaptureFixture) -> None:
    """Old snapshots are upcast when possible, otherwise ignored with a warning (never an error)."""
    t = Transcoder()
    t.register_entity(AccountV2, name="Account", version=2)
    decode = t.decode_entity
    with caplog.at_level(logging.WARNING, logger="trio_es.serialization"):
        assert decode("Account", 1, '{"balance": 3}', aggregate_id="a") is None
        assert "register_entity_upcaster('Account', from_version=1" in caplog.text
        assert decode("Unknown", 1, "{}", aggregate_id="a") is None
        assert decode("Account", 3, "{}", aggregate_id="a") is None
        assert decode("Account", 2, "garbage", aggregate_id="a") is None
        assert decode("Account", 2, '{"cents": "x"}', aggregate_id="a") is None
    assert len(caplog.records) == 5
    t.register_entity_upcaster("Account", from_version=1, fn=lambda d: {"cents": d["balance"]})
    assert decode("Account", 1, '{"balance": 3}', aggregate_id="a") == AccountV2(3)


def test_decoders_are_cached_per_type_and_version(transcoder: Transcoder) -> None:
    """Decoding the same type and version reuses one compiled decoder until a registration."""
    encoded = transcoder.encode_event(Renamed("x", []))
    _decode(transcoder, encoded)
    decoders = transcoder._events.decoders
    first = decoders[("renamed", 1)]
    _decode(transcoder, encoded)
    assert decoders[("renamed", 1)] is first
    transcoder.register_upcaster("renamed", from_version=5, fn=dict)
    assert ("renamed", 1) not in decoders


# -- preparing the hooks up front --


def test_prepare_looks_every_hook_up_before_first_use(transcoder: Transcoder) -> None:
    """After prepare(), encoding and decoding registered classes generates no cattrs code."""
    transcoder.prepare()
    looked_up = count_hook_lookups(transcoder)
    event = _deposited()
    assert _decode(transcoder, transcoder.encode_event(event)) == event
    entity = transcoder.encode_entity(Account(5))
    decoded = transcoder.decode_entity(
        entity.entity_type, entity.entity_version, entity.payload, aggregate_id="acc"
    )
    assert decoded == Account(5)
    assert looked_up == []


def test_without_prepare_hooks_are_looked_up_on_first_use(transcoder: Transcoder) -> None:
    """Unprepared, a class's hooks are looked up on its first encode and decode, then kept."""
    looked_up = count_hook_lookups(transcoder)
    event = _deposited()
    assert _decode(transcoder, transcoder.encode_event(event)) == event
    assert looked_up.count(Deposited) == 2  # unstructure, then structure
    first_use = len(looked_up)
    assert _decode(transcoder, transcoder.encode_event(event)) == event
    assert len(looked_up) == first_use
