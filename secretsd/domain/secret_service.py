"""The secrets domain service: the one place with the rules for versions, check-and-set and deletion.

HTTP handlers, the CLI (through the API) and the scheduler all come through here. Callers have
already authenticated and authorised the principal; the service enforces what must hold whoever
calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from secretsd.clock import Clock, utcnow
from secretsd.custody.barrier import Barrier
from secretsd.domain.identity import Principal
from secretsd.domain.rotation import LABELS, RotationPolicy, check_servable, labels_of
from secretsd.domain.values import encodable, validate_expiry
from secretsd.errors import ConflictError, NotFoundError, PayloadTooLargeError, RequestError, SecretsdError
from secretsd.events import Event, EventBus
from secretsd.paths import validate_path, validate_prefix
from secretsd.records import SecretRecord, VersionInfo, VersionRecord, VersionState, WriteResult
from secretsd.storage import Storage
from secretsd.storage.base import BatchWrite, Seal

T = TypeVar("T")
MAX_METADATA_KEYS = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
# An unconditional write is sealed in its transaction and never conflicts, except when two writers
# create one new secret on PostgreSQL (no row to lock yet: the primary key refuses the loser); the
# loser tries again, and after this many losses the caller hears so.
WRITE_ATTEMPTS = 8
MAX_LIST_LIMIT = 1000
#: Items one batch write may hold: bounds how long it holds the store's write lock.
MAX_BATCH_ITEMS = 1000
#: Storage pages scanned at most to fill one listing page when policies hide many paths.
MAX_LIST_SCANS = 20


@dataclass(frozen=True)
class Put:
    """One write of ``SecretsService.put_batch``: the fields of a single ``put``."""

    path: str
    #: Text (stored as its UTF-8 bytes) or bytes (a binary value, stored as they are).
    value: str | bytes
    cas: int | None = None
    metadata: Mapping[str, Any] | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class ListPage:
    """One page of a listing: the secrets the caller may see, and the cursor of the next page."""

    secrets: list[SecretRecord]
    #: Always one of ``secrets`` (never a hidden path); None on the last page.
    next_after: str | None


@dataclass(frozen=True)
class SecretValue:
    info: VersionInfo
    #: The stored bytes, exactly as written.
    data: bytes
    #: The staging labels the version carries (current, previous, pending).
    labels: tuple[str, ...] = ()

    @property
    def value(self) -> str | None:
        """The value as text, or None when its bytes are not UTF-8 (a binary value)."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return None


def _listing(prefix: str, limit: int) -> str:
    """A listing's prefix, normalised, once its page size is checked."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise RequestError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    return validate_prefix(prefix)


def _plaintext(value: str | bytes) -> bytes:
    """What is sealed: bytes as given, text as its UTF-8 encoding."""
    return value if isinstance(value, bytes) else encodable(value)


def validate_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """User metadata is stored in clear: small string pairs only, checked here once."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise RequestError(f"metadata may have at most {MAX_METADATA_KEYS} keys")
    clean = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY:
            raise RequestError(f"metadata keys must be strings of 1 to {MAX_METADATA_KEY} characters")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise RequestError(
                f"metadata value for {key!r} must be a string of at most {MAX_METADATA_VALUE} characters"
            )
        if "\x00" in key or "\x00" in value:  # PostgreSQL's jsonb cannot hold NUL
            raise RequestError("metadata may not contain NUL characters")
        encodable(key, "metadata key")
        encodable(value, "metadata value")
        clean[key] = value
    return clean


def _versions(versions: Sequence[int]) -> list[int]:
    if not versions:
        raise RequestError("name at least one version")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in versions):
        raise RequestError("versions are positive integers")
    return sorted(set(versions))


class SecretsService:
    def __init__(
        self,
        storage: Storage,
        barrier: Barrier,
        *,
        max_versions: int,
        max_value_bytes: int,
        events: EventBus | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._storage = storage
        self._barrier = barrier
        self._max_versions = max_versions
        self._max_value_bytes = max_value_bytes
        self._events = events or EventBus()
        self._clock = clock

    def _emit(self, action: str, who: Principal, path: str, version: int | None = None,
              **detail: Any) -> None:
        self._events.emit(Event(action, self._clock(), who.client, path, version, detail))

    async def put(
        self,
        who: Principal,
        path: str,
        value: str | bytes,
        *,
        cas: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
    ) -> VersionInfo:
        """Write a new current version. With a rotation policy on the secret, the old current
        version gets the policy's grace period, as after a rotation (docs/rotation.md)."""
        item = self._checked(Put(path, value, cas, metadata, expires_at))
        written: list[VersionRecord] = []
        seal = self._sealer(who, item, written)
        for _ in range(WRITE_ATTEMPTS):
            try:
                result = await self._write(path, seal, cas, item.metadata)
            except ConflictError:
                if cas is not None:
                    raise
                continue  # two creators of one new secret (PostgreSQL): the loser tries again
            return await self._written(who, written[-1], result)
        raise ConflictError(f"{path} is being written concurrently; try again")

    async def put_batch(self, who: Principal, items: Sequence[Put]) -> list[VersionInfo | SecretsdError]:
        """Many writes in one storage transaction (one sync), each checked, sealed and written as
        ``put`` would, with its own outcome in its place: an invalid item or a failed check-and-set
        is reported, never written, and does not stop the others."""
        if len(items) > MAX_BATCH_ITEMS:
            raise RequestError(f"a batch holds at most {MAX_BATCH_ITEMS} items")
        outcomes: list[VersionInfo | SecretsdError | None] = [None] * len(items)
        writes: list[tuple[int, BatchWrite, list[VersionRecord]]] = []
        for i, raw in enumerate(items):
            try:
                item = self._checked(raw)
            except SecretsdError as exc:
                outcomes[i] = exc
                continue
            written: list[VersionRecord] = []
            writes.append((i, BatchWrite(item.path, self._sealer(who, item, written), item.cas, item.metadata),
                           written))
        for _ in range(WRITE_ATTEMPTS):
            try:
                results = await self._storage.write_batch([w for _, w, _ in writes], max_versions=self._max_versions)
                break
            except ConflictError:
                continue  # two creators of one new secret (PostgreSQL) aborted it all: try it all again
        else:
            raise ConflictError("the batch's secrets are being written concurrently; try again")
        for (i, _, written), result in zip(writes, results, strict=True):
            outcomes[i] = result if isinstance(result, ConflictError) else await self._written(who, written[-1], result)
        return [o for o in outcomes if o is not None]

    def _checked(self, item: Put) -> Put:
        """``item`` with its value as bytes and its metadata and expiry validated, or the reason it
        cannot be written."""
        validate_path(item.path)
        plaintext = _plaintext(item.value)
        if len(plaintext) > self._max_value_bytes:
            raise PayloadTooLargeError(f"the value is larger than {self._max_value_bytes} bytes")
        if item.cas is not None and item.cas < 0:
            raise RequestError("cas must be 0 (create only) or an existing version number")
        # The value as the bytes to seal, encoded once here rather than again in the seal.
        return dataclasses.replace(
            item, value=plaintext, metadata=validate_metadata(item.metadata) if item.metadata is not None else None,
            expires_at=validate_expiry(item.expires_at, self._clock()))

    def _sealer(self, who: Principal, item: Put, written: list[VersionRecord]) -> Seal:
        """The seal a write of ``item`` runs inside its transaction; it keeps what it made in ``written``."""
        plaintext = _plaintext(item.value)

        def seal(secret: SecretRecord | None) -> tuple[VersionRecord, datetime | None]:
            # Not current + 1: a pending rotation (or a discarded one) may hold that number.
            version = (secret.latest_version if secret else 0) + 1
            sealed = self._barrier.seal_value(item.path, version, plaintext)
            now = self._clock()
            grace_until = None
            if secret is not None and secret.rotation is not None:
                grace_until = now + RotationPolicy.parse(secret.rotation).grace
            written.append(VersionRecord(
                path=item.path, version=version, created_at=now, created_by=who.client,
                state=VersionState.ACTIVE, term=sealed.term, nonce=sealed.nonce,
                ciphertext=sealed.ciphertext, expires_at=item.expires_at,
            ))
            return written[-1], grace_until

        return seal

    async def _written(self, who: Principal, record: VersionRecord, result: WriteResult) -> VersionRecord:
        await self._barrier.note_encryptions(record.term, result.term_encryptions)
        self._emit("secret.write", who, record.path, record.version)
        return record

    async def _write(
        self, path: str, seal: Seal, cas: int | None, metadata: Mapping[str, Any] | None
    ) -> WriteResult:
        if cas is None:
            # Sealed inside the write transaction for the number it gets: no read first, and
            # unconditional writers of one path never answer 409.
            return await self._storage.write_unconditional(path, seal, metadata=metadata,
                                                           max_versions=self._max_versions)
        secret = await self._storage.get_secret(path)
        current = secret.current_version if secret else 0
        if cas != current:
            raise ConflictError(f"check-and-set failed: {path} is at version {current}, not {cas}")
        record, grace_until = seal(secret)
        return await self._storage.write_version(record, expected_current=current, metadata=metadata,
                                                 max_versions=self._max_versions, grace_until=grace_until)

    async def get(self, who: Principal, path: str, version: int | None = None, *, label: str | None = None,
                  privileged: bool = False, may_read_pending: bool = False) -> SecretValue:
        """A version by number or staging label (default: current), if the serving rule allows.

        ``privileged``: the caller holds ``admin`` on the path (reads past the grace period);
        ``may_read_pending``: it holds ``rotate`` (reads the pending version).
        """
        validate_path(path)
        if version is not None and version < 1:
            raise RequestError("version must be a positive integer")
        if label is not None and label not in LABELS:
            raise RequestError(f"label must be one of {', '.join(LABELS)}")
        if label is not None and version is not None:
            raise RequestError("ask for a version or a label, not both")
        found = await self._storage.read_version(path, version=version, label=label or "current")
        if found is None:
            if version is not None:
                raise NotFoundError(f"{path} has no version {version}")
            if label in (None, "current"):
                raise NotFoundError(f"no secret at {path}")
            raise NotFoundError(f"{path} has no {label} version")
        return await self._serve(who, *found, privileged=privileged, may_read_pending=may_read_pending)

    async def _serve(self, who: Principal, secret: SecretRecord, record: VersionRecord, *, privileged: bool = False,
                     may_read_pending: bool = False) -> SecretValue:
        """A version read from the store, opened if the serving rule allows it to be read."""
        check_servable(secret, record, now=self._clock(), privileged=privileged, may_read_pending=may_read_pending)
        plaintext = await self._barrier.open_value(record)
        self._emit("secret.read", who, secret.path, record.version)
        return SecretValue(record, plaintext, tuple(labels_of(secret, record.version)))

    async def list_secrets(self, who: Principal, prefix: str, *, after: str = "",
                   limit: int = MAX_LIST_LIMIT) -> list[SecretRecord]:
        return await self._storage.list_secrets(_listing(prefix, limit), after=after, limit=limit)

    async def list_page(self, who: Principal, prefix: str, *, after: str = "", limit: int = MAX_LIST_LIMIT,
                        visible: Callable[[list[str]], set[str]]) -> ListPage:
        """A page of at most ``limit`` secrets below ``prefix``, after ``after``, of those ``visible``
        lets the caller see (the policy filter: a deny on one path hides it)."""
        shown, next_after = await self._page(prefix, after, limit, visible, self._storage.list_secrets,
                                             lambda s: s.path)
        return ListPage(shown, next_after)

    async def _page(self, prefix: str, after: str, limit: int, visible: Callable[[list[str]], set[str]],
                    fetch: Callable[..., Awaitable[list[T]]], path_of: Callable[[T], str],
                    ) -> tuple[list[T], str | None]:
        """The rule of a listing page, for secrets (``list_page``) and for values (``read_page``).

        Storage pages are scanned until the page is full, the store ends or MAX_LIST_SCANS pages
        were read; the cursor is always a shown path, so it never names a hidden one.
        """
        prefix = _listing(prefix, limit)
        if after:
            validate_path(after)
        shown: list[T] = []
        more = False
        for _ in range(MAX_LIST_SCANS):
            found = await fetch(prefix, after=after, limit=limit)
            seen = visible([path_of(item) for item in found])
            left_over = False
            for item in found:
                if path_of(item) in seen:
                    if len(shown) < limit:
                        shown.append(item)
                    else:
                        left_over = True
            more = len(found) == limit or left_over
            if len(shown) == limit or not more:
                break
            after = path_of(found[-1])
        return shown, path_of(shown[-1]) if shown and more else None

    async def read_page(self, who: Principal, prefix: str, *, after: str = "", limit: int = MAX_LIST_LIMIT,
                        visible: Callable[[list[str]], set[str]],
                        ) -> tuple[list[tuple[str, SecretValue | SecretsdError]], str | None]:
        """The current values of a page of the secrets below ``prefix`` that ``visible`` lets the
        caller read, each served as ``get`` serves it; one that cannot be served (deleted, expired)
        is reported in its place with the reason, and does not stop the others. The page is one
        read of the store: the listing and the current versions together."""
        page, next_after = await self._page(prefix, after, limit, visible, self._storage.read_current_page,
                                            lambda found: found[0].path)
        out: list[tuple[str, SecretValue | SecretsdError]] = []
        for secret, record in page:
            try:
                if record is None:
                    raise NotFoundError(f"no secret at {secret.path}")
                out.append((secret.path, await self._serve(who, secret, record)))
            except SecretsdError as exc:
                out.append((secret.path, exc))
        return out, next_after

    async def metadata(self, who: Principal, path: str) -> tuple[SecretRecord, list[VersionInfo]]:
        validate_path(path)
        secret = await self._storage.get_secret(path)
        if secret is None:
            raise NotFoundError(f"no secret at {path}")
        return secret, await self._storage.list_versions(path)

    async def delete(self, who: Principal, path: str, versions: Sequence[int] | None = None) -> list[int]:
        """Soft-delete ``versions`` (default: the current one); they can be undeleted."""
        validate_path(path)
        secret = await self._storage.get_secret(path)
        if secret is None:
            raise NotFoundError(f"no secret at {path}")
        wanted = _versions(versions) if versions is not None else [secret.current_version]
        changed = await self._storage.set_version_state(path, wanted, VersionState.DELETED, self._clock())
        self._emit("secret.delete", who, path, versions=changed)
        return changed

    async def undelete(self, who: Principal, path: str, versions: Sequence[int]) -> list[int]:
        validate_path(path)
        wanted = _versions(versions)
        if await self._storage.get_secret(path) is None:
            raise NotFoundError(f"no secret at {path}")
        changed = await self._storage.set_version_state(path, wanted, VersionState.ACTIVE, self._clock())
        self._emit("secret.undelete", who, path, versions=changed)
        return changed

    async def destroy(self, who: Principal, path: str, versions: Sequence[int]) -> list[int]:
        """Erase the ciphertext of ``versions`` for good; their metadata stays, marked destroyed."""
        validate_path(path)
        wanted = _versions(versions)
        if await self._storage.get_secret(path) is None:
            raise NotFoundError(f"no secret at {path}")
        changed = await self._storage.set_version_state(path, wanted, VersionState.DESTROYED, self._clock())
        self._emit("secret.destroy", who, path, versions=changed)
        return changed
