"""The Vault façade's one value mapping (secretsd.domain.kv_map), both ways, and the edge's LIST rule."""

from __future__ import annotations

import pytest

from secretsd.domain import kv_map
from secretsd.errors import RequestError
from secretsd.runtime.edge import list_as_get

MAPS = [
    {"value": "x"},
    {"value": ""},
    {"user": "a", "pass": "b"},
    {},
    {"value": "x", "other": "y"},
    {"value_base64": "AAEC"},
    # A value that is itself the text of a map of strings must not read back as that map.
    {"value": '{"user":"a"}'},
    {"value": '{"b": "1", "a": "2"}'},
    {"värde": "ünïcödé", "emoji": "🔑"},
    {"value": '{"n": 1}'},
    # What a binary value reads as, written back; and texts that only look like it.
    {"value_base64": "//5oaQ=="},
    {"value_base64": "not base64"},
    {"value": '{"value_base64":"//5oaQ=="}'},
]


@pytest.mark.parametrize("data", MAPS)
def test_a_map_written_through_the_facade_reads_back_as_written(data: dict[str, str]) -> None:
    stored = kv_map.stored_value(data)
    assert kv_map.as_map(stored.encode("utf-8") if isinstance(stored, str) else stored) == data


def test_a_plain_value_map_is_stored_as_the_value_itself() -> None:
    # bao kv put secret/app/db value=x: `secretsd get app/db` and `run` see x.
    assert kv_map.stored_value({"value": "x"}) == "x"
    assert kv_map.stored_value({"value": "line1\nline2"}) == "line1\nline2"
    assert kv_map.stored_value({"value": '{"n": 1}'}) == '{"n": 1}'  # not a map of strings: as is


def test_any_other_map_is_stored_as_canonical_json() -> None:
    assert kv_map.stored_value({"user": "a", "pass": "b"}) == '{"pass":"b","user":"a"}'
    assert kv_map.stored_value({"value": '{"user":"a"}'}) == '{"value":"{\\"user\\":\\"a\\"}"}'
    assert kv_map.stored_value({"k": "ü"}) == '{"k":"ü"}'


@pytest.mark.parametrize(("stored", "read"), [
    (b"x", {"value": "x"}),
    (b'{"a":"b"}', {"a": "b"}),
    (b'{ "b" : "1", "a": "2" }', {"a": "2", "b": "1"}),
    (b'{"a": 1}', {"value": '{"a": 1}'}),  # not all strings: the text
    (b'{"a":"b","a":"c"}', {"value": '{"a":"b","a":"c"}'}),  # a duplicate key is not a map
    (b"[1, 2]", {"value": "[1, 2]"}),
    (b"{not json", {"value": "{not json"}),
    (b"", {"value": ""}),
    (b"\xff\x00binary", {"value_base64": "/wBiaW5hcnk="}),
])
def test_a_value_written_natively_reads_through_the_facade(stored: bytes, read: dict[str, str]) -> None:
    assert kv_map.as_map(stored) == read


def test_non_string_values_are_refused_not_stored() -> None:
    for data in ({"port": 5432}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}}, {"a": True}):
        with pytest.raises(RequestError, match="must be a string"):
            kv_map.check_map(data)
    with pytest.raises(RequestError):
        kv_map.check_map(["x"])


def test_field_of_picks_a_key_of_a_json_object_value() -> None:
    assert kv_map.field_of('{"user":"a","pass":"b"}', "user") == "a"
    assert kv_map.field_of("plain", "value") == "plain"
    with pytest.raises(RequestError, match="no field 'pass'"):
        kv_map.field_of('{"user":"a"}', "pass")


PREFIX = b"/v1/secret/metadata"


def test_list_is_taken_as_get_with_list_true_under_the_metadata_path_only() -> None:
    head = b"LIST /v1/secret/metadata/app HTTP/1.1\r\nHost: x\r\n\r\n"
    assert list_as_get(head, PREFIX) == b"GET /v1/secret/metadata/app?list=true HTTP/1.1\r\nHost: x\r\n\r\n"
    assert list_as_get(b"LIST /v1/secret/metadata/?a=1 HTTP/1.1\r\n\r\n", PREFIX) == \
        b"GET /v1/secret/metadata/?a=1&list=true HTTP/1.1\r\n\r\n"
    # Elsewhere (a native path, another mount), split or malformed: left for the parser to refuse.
    for other in (b"LIST /v1/secrets/app HTTP/1.1\r\n\r\n", b"LIST /v1/kv/metadata/a HTTP/1.1\r\n\r\n",
                  b"LIST /v1/secret/metadata/a", b"LIST /v1/secret/metadata/a b HTTP/1.1\r\n\r\n"):
        assert list_as_get(other, PREFIX) == other


STORED: list[bytes] = [b"x", b"", b"\xff\xfehi", b"\x00\x01\x02", b'{"value_base64":"//5oaQ=="}',
                       b'{"value_base64":"AAEC"}', b'{"a":"b"}', b'{"value":"{\\"a\\":\\"b\\"}"}', "ünï".encode(),
                       b'{"value":"x"}', b'{"value":"{\\"value\\":\\"x\\"}"}', b'{"value": "x"}']


@pytest.mark.parametrize("stored", STORED)
def test_any_stored_value_read_and_written_back_through_the_facade_is_unchanged(stored: bytes) -> None:
    # A read-modify-write through a Vault client must not turn bytes into text or one text into
    # another: the mapping is one-to-one on what the store holds.
    again = kv_map.stored_value(kv_map.as_map(stored))
    assert (again.encode("utf-8") if isinstance(again, str) else again) == stored


def test_a_binary_value_and_a_text_spelling_its_map_read_differently() -> None:
    binary = kv_map.as_map(b"\xff\xfehi")
    assert binary == {"value_base64": "//5oaQ=="}
    assert kv_map.as_map(b'{"value_base64":"//5oaQ=="}') == {"value": '{"value_base64":"//5oaQ=="}'}
    assert kv_map.stored_value(binary) == b"\xff\xfehi"
