"""The backup file, version 1: written and read as a stream, so memory stays flat in the store's size.

Layout (docs/backup.md)::

    SECRETSD-BACKUP 1\\n                    magic line, raw
    zlib stream of lines:
      {header}\\n                           backup_id, created_at, source (canonical JSON)
      #section meta\\n                      then one canonical row per line (``rows.canonical_line``)
      #section keyring_terms\\n ... #section tokens\\n   every table of ``rows.TABLES``, in that order
    {"mac": ..., "manifest": {...}}\\n      trailer, raw, canonical JSON

The manifest holds the format version, the backup id, time and source, per section the row count
and the SHA-256 of its row lines (the same digest ``storage migrate`` compares), the SHA-256 of every
byte before the trailer (``stream_sha256``: a flipped byte anywhere, even one the decompressor
would not notice, changes it), and ``mac_term``. ``mac`` is HMAC-SHA256 over the canonical manifest
under ``keys.manifest_key`` of that term. The reader enforces bounds on everything a hostile file
chooses (line length, trailer size, keyring rows, declared counts) and returns what it read; the
checks against the manifest are ``check_authentic`` then ``check_integrity``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from secretsd.backup.errors import BackupCorruptError, BackupForgedError
from secretsd.custody.crypto import hmac_sha256
from secretsd.storage import rows

MAGIC = b"SECRETSD-BACKUP 1\n"
FORMAT_VERSION = 1
SECTIONS: tuple[str, ...] = rows.TABLES
SECTION_PREFIX = b"#section "
CHUNK = 1 << 16
#: The longest line a reader accepts: a row with the largest value max_value_bytes allows (16 MiB,
#: base64 in the line) fits; a line beyond it is refused before it is buffered whole.
MAX_LINE = 32 << 20
MAX_TRAILER = 1 << 16
#: Keyring rows are kept in memory to unwrap; a store makes a term per ~2^31 encryptions.
MAX_TERMS = 10_000
#: A keyring row is ~300 bytes per provider wrapping it; a longer one is refused as it is read. The
#: rows are kept as read (bytes, at most ``MAX_KEYRING_BYTES`` in all) and decoded one at a time, so
#: a forged row cannot expand in memory before the MAC is checked (threat model: backup bombs).
MAX_TERM_LINE = 64 << 10
MAX_KEYRING_BYTES = 16 << 20
#: The import pass hands rows over in batches of at most this many bytes of lines (or batch_size rows).
MAX_BATCH_BYTES = 8 << 20
#: A declared row count above this is refused as malformed (nothing is ever sized by a count).
MAX_ROWS = 1 << 40
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Section:
    name: str
    rows: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    created_at: str
    source: str
    secretsd_version: str
    mac_term: int
    sections: tuple[Section, ...]
    stream_sha256: str
    format: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "backup_id": self.backup_id, "created_at": self.created_at,
                "source": self.source, "secretsd_version": self.secretsd_version, "mac_term": self.mac_term,
                "sections": [s.to_dict() for s in self.sections], "stream_sha256": self.stream_sha256}

    @property
    def sha256(self) -> str:
        """The manifest's digest: what the restore's audit record names."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.sections)

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        """A manifest as the trailer states it; ``BackupCorruptError`` unless every field is well formed."""
        def bad(what: str) -> BackupCorruptError:
            return BackupCorruptError(f"the backup's manifest is malformed ({what})")

        if not isinstance(doc, dict):
            raise bad("not an object")
        expected = {"format", "backup_id", "created_at", "source", "secretsd_version", "mac_term", "sections",
                    "stream_sha256"}
        if set(doc) != expected:
            raise bad("unexpected or missing fields")
        if doc["format"] != FORMAT_VERSION:
            raise BackupCorruptError(f"the backup's format version {doc['format']!r} is not one this secretsd reads "
                                     f"({FORMAT_VERSION})")
        for name in ("backup_id", "created_at", "source", "secretsd_version", "stream_sha256"):
            if not isinstance(doc[name], str) or len(doc[name]) > 1024:
                raise bad(name)
        if not _ID.fullmatch(doc["backup_id"]) or not _HEX64.fullmatch(doc["stream_sha256"]):
            raise bad("backup_id or stream_sha256")
        if not _is_count(doc["mac_term"]) or doc["mac_term"] < 1:
            raise bad("mac_term")
        raw = doc["sections"]
        if not isinstance(raw, list) or len(raw) != len(SECTIONS):
            raise bad("sections")
        sections = []
        for item, name in zip(raw, SECTIONS, strict=True):
            if (not isinstance(item, dict) or set(item) != {"name", "rows", "sha256"} or item["name"] != name
                    or not isinstance(item["sha256"], str) or not _HEX64.fullmatch(item["sha256"])):
                raise bad(f"section {name}")
            if not _is_count(item["rows"]):
                raise bad(f"the row count of section {name} is not a count from 0 to {MAX_ROWS}")
            sections.append(Section(name, item["rows"], item["sha256"]))
        return cls(backup_id=doc["backup_id"], created_at=doc["created_at"], source=doc["source"],
                   secretsd_version=doc["secretsd_version"], mac_term=doc["mac_term"], sections=tuple(sections),
                   stream_sha256=doc["stream_sha256"])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ROWS


def manifest_mac(key: bytes, manifest: Manifest) -> str:
    return hmac_sha256(key, canonical_json(manifest.to_dict())).hex()


def check_authentic(key: bytes, manifest: Manifest, mac: str) -> None:
    """The rule: a manifest counts only if its MAC verifies under the keyring's manifest key."""
    if not hmac.compare_digest(manifest_mac(key, manifest).encode(), mac.encode()):
        raise BackupForgedError(
            "the backup's manifest does not verify under this store's keyring: it was altered, or it was "
            "made by another store (another keyring); refusing it"
        )


# -- writing ----------------------------------------------------------------------------------------
class Sink(Protocol):
    """Where a backup is written: a file, or what an HTTP response sends next."""

    def write(self, data: bytes, /) -> int: ...


class BackupWriter:
    """Writes a backup to ``out`` as rows arrive: compressed, hashed, never held whole."""

    def __init__(self, out: Sink, *, backup_id: str, created_at: str, source: str) -> None:
        self._out = out
        self._stream = hashlib.sha256()
        self._z = zlib.compressobj(6)
        self._header = {"backup_id": backup_id, "created_at": created_at, "format": FORMAT_VERSION,
                        "source": source}
        self._sections: list[Section] = []
        self._current: tuple[str, Any, int] | None = None  # (name, sha256 object, rows)
        self._raw(MAGIC)
        self._emit(canonical_json(self._header) + b"\n")

    def _raw(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self._stream.update(data)

    def _emit(self, data: bytes) -> None:
        self._raw(self._z.compress(data))

    def _close_section(self) -> None:
        if self._current is not None:
            name, digest, count = self._current
            self._sections.append(Section(name, count, digest.hexdigest()))
            self._current = None

    def section(self, name: str) -> None:
        expected = SECTIONS[len(self._sections) + (self._current is not None)]
        if name != expected:
            raise ValueError(f"section {name} out of order (expected {expected})")
        self._close_section()
        self._emit(SECTION_PREFIX + name.encode() + b"\n")
        self._current = (name, hashlib.sha256(), 0)

    def rows(self, batch: Sequence[Mapping[str, Any]]) -> None:
        if self._current is None:
            raise ValueError("rows before a section")
        name, digest, count = self._current
        for row in batch:
            line = rows.canonical_line(name, row)
            digest.update(line)
            self._emit(line)
        self._current = (name, digest, count + len(batch))

    def finish(self, *, key: bytes, mac_term: int, secretsd_version: str) -> Manifest:
        self._close_section()
        if len(self._sections) != len(SECTIONS):
            raise ValueError("a backup needs every section")
        self._raw(self._z.flush())
        manifest = Manifest(backup_id=str(self._header["backup_id"]), created_at=str(self._header["created_at"]),
                            source=str(self._header["source"]), secretsd_version=secretsd_version,
                            mac_term=mac_term, sections=tuple(self._sections),
                            stream_sha256=self._stream.hexdigest())
        self._out.write(canonical_json({"mac": manifest_mac(key, manifest), "manifest": manifest.to_dict()}) + b"\n")
        return manifest


# -- reading ----------------------------------------------------------------------------------------
@dataclass
class ReadResult:
    """What a full read of a backup found, before any check against its manifest."""

    header: dict[str, Any]
    manifest: Manifest
    mac: str
    stream_sha256: str
    counted: dict[str, Section]
    keyring_lines: list[bytes] = field(default_factory=list)

    @property
    def keyring(self) -> Iterator[rows.Row]:
        """The keyring rows, decoded one at a time (``BackupCorruptError`` at the first malformed one)."""
        return (_row("keyring_terms", line) for line in self.keyring_lines)

    def check_integrity(self) -> None:
        """The rule: every section's count and digest, the header and every byte of the stream are
        as the (authenticated) manifest states them."""
        if self.header.get("backup_id") != self.manifest.backup_id:
            raise BackupCorruptError("the backup's header names another backup than its manifest")
        for declared in self.manifest.sections:
            found = self.counted[declared.name]
            if found.rows != declared.rows:
                raise BackupCorruptError(f"section {declared.name} holds {found.rows} rows; its manifest says "
                                         f"{declared.rows}")
            if found.sha256 != declared.sha256:
                raise BackupCorruptError(f"section {declared.name} does not match its manifest digest (altered, "
                                         "or taken from another backup)")
        if self.stream_sha256 != self.manifest.stream_sha256:
            raise BackupCorruptError("the backup's bytes do not match its manifest digest (altered)")


class BackupReader:
    """Reads a backup from ``fh`` as a stream of row batches; ``result`` once the stream is done.

    Structural damage (not a backup, a broken or truncated stream, a line too long, sections out of
    order, a row no writer could have written) raises ``BackupCorruptError`` as soon as it is met.
    """

    def __init__(self, fh: BinaryIO, *, batch_size: int = 500, decode: bool = True) -> None:
        self._fh = fh
        self._batch_size = batch_size
        # Verification needs the keyring rows only: every other line is hashed and counted, not parsed
        # (nothing unauthenticated is imported, and the MAC covers every byte of an authentic file).
        self._decode = decode
        # The longest line the current section may hold, so a long keyring row is refused before it
        # is buffered whole (batches() sets it as each section starts).
        self._line_limit = MAX_LINE
        self.result: ReadResult | None = None

    def _lines(self, stream: Any) -> Iterator[bytes]:
        """Decompressed lines, then the raw trailer left in ``stream['trailer']``."""
        magic = self._fh.read(len(MAGIC))
        if magic != MAGIC:
            raise BackupCorruptError("not a secretsd backup (its first line is not the backup magic)")
        digest = hashlib.sha256(magic)
        z = zlib.decompressobj()
        pending = bytearray()
        while not z.eof:
            chunk = self._fh.read(CHUNK)
            data = chunk
            while not z.eof:
                try:
                    out = z.decompress(data, CHUNK)
                except zlib.error as exc:
                    raise BackupCorruptError(f"the backup is damaged (invalid compressed stream: {exc})") from exc
                # At the stream's end the input left over is unused_data (unconsumed_tail may hold it too).
                used = len(data) - (len(z.unused_data) if z.eof else len(z.unconsumed_tail))
                digest.update(data[:used])
                data = b"" if z.eof else z.unconsumed_tail
                pending += out
                start = 0
                while (end := pending.find(b"\n", start)) >= 0:
                    yield bytes(pending[start:end + 1])
                    start = end + 1
                del pending[:start]
                if len(pending) > self._line_limit:
                    raise BackupCorruptError(f"the backup holds a line longer than {self._line_limit} bytes")
                if not data and len(out) < CHUNK:
                    break  # this input is consumed and no output is held back
            if not chunk and not z.eof:
                raise BackupCorruptError("the backup is truncated (its compressed stream does not end)")
        if pending:
            raise BackupCorruptError("the backup's stream ends inside a line")
        trailer = z.unused_data + self._fh.read(MAX_TRAILER + 1 - len(z.unused_data))
        if len(trailer) > MAX_TRAILER:
            raise BackupCorruptError("the backup has more data after its manifest than a manifest takes")
        stream["trailer"] = trailer
        stream["sha256"] = digest.hexdigest()

    def batches(self) -> Iterator[tuple[str, list[rows.Row]]]:
        """Yield (section, rows) in file order; sets ``result`` after the last one."""
        stream: dict[str, Any] = {}
        lines = self._lines(stream)
        header = _header(next(lines, b""))
        counted: dict[str, Section] = {}
        keyring: list[bytes] = []
        keyring_bytes = 0
        table: str | None = None
        digest: Any = None
        count = 0
        batch: list[rows.Row] = []
        batch_bytes = 0

        def close() -> Iterator[tuple[str, list[rows.Row]]]:
            if table is not None:
                if batch:
                    yield table, batch
                counted[table] = Section(table, count, digest.hexdigest())

        for line in lines:
            if line.startswith(SECTION_PREFIX):
                yield from close()
                batch, batch_bytes = [], 0
                name = line[len(SECTION_PREFIX):-1].decode("ascii", "replace")
                expected = SECTIONS[len(counted)] if len(counted) < len(SECTIONS) else None
                if name != expected:
                    raise BackupCorruptError(f"the backup's section {name!r} is out of place (expected {expected})")
                table, digest, count = name, hashlib.sha256(), 0
                self._line_limit = MAX_TERM_LINE if table == "keyring_terms" else MAX_LINE
                continue
            if table is None:
                raise BackupCorruptError("the backup holds rows outside any section")
            if not line.startswith(b"{"):
                raise BackupCorruptError(f"the backup holds a malformed row in section {table}")
            digest.update(line)
            count += 1
            if table == "keyring_terms":
                keyring_bytes += len(line)
                _check_keyring_bounds(count, len(line), keyring_bytes)
                keyring.append(line)
            if not self._decode:
                continue
            batch.append(_row(table, line))
            batch_bytes += len(line)
            if len(batch) >= self._batch_size or batch_bytes >= MAX_BATCH_BYTES:
                yield table, batch
                batch, batch_bytes = [], 0
        yield from close()
        if len(counted) != len(SECTIONS):
            raise BackupCorruptError(f"the backup lacks section(s) {', '.join(SECTIONS[len(counted):])}")
        manifest, mac = _trailer(stream["trailer"])
        self.result = ReadResult(header, manifest, mac, stream["sha256"], counted, keyring)

    def read_all(self) -> ReadResult:
        """Read the whole file for its checks: the keyring rows kept as read, the other rows hashed only."""
        self._decode = False
        for _ in self.batches():
            pass
        assert self.result is not None
        return self.result


def _check_keyring_bounds(count: int, line_bytes: int, total_bytes: int) -> None:
    """The rule "a backup bomb is refused before the MAC check": the keyring rows, the only rows read
    into memory before the manifest is authenticated, are bounded in number, length and total."""
    if count > MAX_TERMS:
        raise BackupCorruptError(f"the backup holds more than {MAX_TERMS} keyring terms")
    if line_bytes > MAX_TERM_LINE:
        raise BackupCorruptError(f"the backup holds a keyring row longer than {MAX_TERM_LINE} bytes")
    if total_bytes > MAX_KEYRING_BYTES:
        raise BackupCorruptError(f"the backup's keyring rows exceed {MAX_KEYRING_BYTES} bytes")


def _header(line: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if (not isinstance(doc, dict) or set(doc) != {"backup_id", "created_at", "format", "source"}
            or canonical_json(doc) + b"\n" != line):
        raise BackupCorruptError("the backup's header is missing or malformed")
    if doc["format"] != FORMAT_VERSION:
        raise BackupCorruptError(f"the backup's format version {doc['format']!r} is not one this secretsd reads")
    return doc


def _row(table: str, line: bytes) -> rows.Row:
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        row = rows.from_canonical(table, doc)
    except (ValueError, TypeError) as exc:
        raise BackupCorruptError(f"the backup holds a malformed row in section {table} ({exc})") from exc
    return row


def read_trailer(tail: bytes) -> tuple[Manifest, str]:
    """The manifest and MAC of a file's last bytes (at most ``MAX_TRAILER``), unchecked: what a
    downloader reports; ``BackupCorruptError`` if they hold no manifest (a cut download)."""
    start = tail.rfind(b'{"mac":"')
    if start < 0:
        raise BackupCorruptError("the backup has no manifest (truncated?)")
    return _trailer(tail[start:])


def _trailer(raw: bytes) -> tuple[Manifest, str]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or set(doc) != {"mac", "manifest"} or canonical_json(doc) + b"\n" != raw:
        raise BackupCorruptError("the backup's manifest is missing or malformed (truncated?)")
    if not isinstance(doc["mac"], str) or not _HEX64.fullmatch(doc["mac"]):
        raise BackupCorruptError("the backup's manifest MAC is malformed")
    return Manifest.from_dict(doc["manifest"]), doc["mac"]
