"""CacheEncryptor / CacheDecryptor: one entry at a time, the reference path.

The batched paths (backends/) produce exactly the same envelope; these classes
are what a tenant, an auditor or a test uses to seal or open one chunk.
``encrypt_entry`` / ``decrypt_entry`` are the methods; ``encrypt`` / ``decrypt``
are the same methods under shorter names.
"""

from __future__ import annotations

import threading

from cryptography.exceptions import InvalidTag

from ._checks import check_int
from .envelope import NONCE_SIZE, EncryptedEntry, EntryMetadata, KVCacheEntry, dtype_code, make_nonce
from .errors import (
    DecryptionError,
    MalformedEntryError,
    NonceReplayError,
    TenantIsolationError,
)
from .session import TenantSession

__all__ = ["CacheEncryptor", "CacheDecryptor", "ReplayWindow", "NONCE_SIZE",
           "MIN_REPLAY_WINDOW", "MAX_REPLAY_WINDOW", "DEFAULT_MAX_EPOCH_WINDOWS"]

MIN_REPLAY_WINDOW = 64
# A window is a bitmap of ``size`` bits: 2^20 counters is 128 KiB per epoch.
MAX_REPLAY_WINDOW = 1 << 20
# Replay windows a decryptor keeps (one per epoch it opened entries of); see CacheDecryptor.
DEFAULT_MAX_EPOCH_WINDOWS = 256


def _check_owner(session: TenantSession, meta: EntryMetadata, verb: str) -> None:
    if meta.tenant_id != session.tenant_id:
        raise TenantIsolationError(
            f"tenant {session.tenant_id!r} may not {verb} an entry of tenant {meta.tenant_id!r}")
    if meta.session_id != session.session_id:
        raise TenantIsolationError(
            f"entry belongs to session {meta.session_id}, not to session {session.session_id} "
            f"of tenant {session.tenant_id!r}")


class CacheEncryptor:
    """Seal KVCacheEntry objects under a session's current epoch key.

    Each call takes the next nonce counter of the session's current epoch
    (``sequence_number`` 1, 2, 3, ... restarting with each epoch; the nonce is
    (epoch, counter), never reused). SessionExpiredError for an expired session,
    TenantIsolationError for another tenant's or session's entry,
    KeyRotationRequiredError at the session's per-epoch cap.
    """

    def __init__(self, session: TenantSession):
        if not isinstance(session, TenantSession):
            raise TypeError(f"session must be a TenantSession, got {type(session).__name__}")
        self.session = session

    def encrypt_entry(self, entry: KVCacheEntry, *, dtype: str = "", num_heads: int = 0,
                      head_dim: int = 0) -> EncryptedEntry:
        """Seal one entry; ``dtype``, ``num_heads`` and ``head_dim`` are bound into the AAD where known."""
        if not isinstance(entry, KVCacheEntry):
            raise TypeError(f"entry must be a KVCacheEntry, got {type(entry).__name__}")
        if not isinstance(entry.key_tensor_bytes, (bytes, bytearray, memoryview)) or \
                not isinstance(entry.value_tensor_bytes, (bytes, bytearray, memoryview)):
            raise TypeError("key_tensor_bytes and value_tensor_bytes must be bytes")
        if not isinstance(entry.metadata, EntryMetadata):
            raise TypeError(f"entry.metadata must be an EntryMetadata, got {type(entry.metadata).__name__}")
        # everything the AAD binds is checked before a counter is taken: a refused call changes nothing
        dtype_code(dtype)
        num_heads = check_int("num_heads", num_heads, 0, 0xFFFFFFFF)
        head_dim = check_int("head_dim", head_dim, 0, 0xFFFFFFFF)
        k = bytes(entry.key_tensor_bytes)
        if len(k) > 0xFFFFFFFF:
            raise ValueError(f"key_tensor_bytes holds {len(k)} bytes; the AAD's K length is 32 bits")
        s = self.session
        _check_owner(s, entry.metadata, "encrypt")
        epoch, counter = s.reserve(1)
        out = EncryptedEntry(entry.metadata, make_nonce(epoch, counter), b"", len(k), counter,
                             epoch, dtype, num_heads, head_dim)
        out.ciphertext = s.cipher(epoch).encrypt(out.nonce_bytes, k + bytes(entry.value_tensor_bytes), out.aad())
        return out

    encrypt = encrypt_entry


class ReplayWindow:
    """Bounded replay detection for counters: a sliding bitmap of ``size`` counters below the highest seen.

    A counter above the window's top is accepted and slides the window; one
    inside the window is accepted once; one below the window is refused (it is
    too old to tell), so memory stays ``size`` bits whatever the traffic.
    """

    def __init__(self, size: int = 1 << 16):
        self.size = check_int("replay window size", size, MIN_REPLAY_WINDOW, MAX_REPLAY_WINDOW)
        self._mask = (1 << self.size) - 1
        self.top = -1          # highest counter accepted
        self.bits = 0          # bit i set: counter (top - i) seen

    def check(self, counter: int) -> None:
        """NonceReplayError if ``counter`` was seen or is older than the window."""
        if counter > self.top:
            return
        offset = self.top - counter
        if offset >= self.size:
            raise NonceReplayError(f"counter {counter} is older than the replay window ({self.size}); refused")
        if (self.bits >> offset) & 1:
            raise NonceReplayError(f"counter {counter} was already opened")

    def mark(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


class CacheDecryptor:
    """Open EncryptedEntry objects of one session, refusing replays and other tenants' entries.

    * An entry of another tenant or session: TenantIsolationError.
    * A (epoch, counter) already opened by this decryptor: NonceReplayError.
      Memory is bounded: one ReplayWindow of ``replay_window`` counters
      (64 ... 2^20) per epoch, created only once an entry of that epoch has
      authenticated (an entry naming an epoch the session has no key for never
      creates one), and at most ``max_epochs`` of them. Windows of retired
      epochs are dropped first; beyond that the oldest epoch's window is
      dropped and entries of that epoch and older are refused from then on
      (NonceReplayError), as a window refuses counters older than itself.
    * Any tag failure — changed byte, chunk moved to another layer, position or
      tenant, changed key_len or sequence number, retired epoch key:
      DecryptionError naming tenant, layer and positions.
    * An expired or closed session: SessionExpiredError (SessionClosedError).
    """

    def __init__(self, session: TenantSession, replay_window: int = 1 << 16, *,
                 max_epochs: int = DEFAULT_MAX_EPOCH_WINDOWS):
        if not isinstance(session, TenantSession):
            raise TypeError(f"session must be a TenantSession, got {type(session).__name__}")
        self.session = session
        self._window_size = check_int("replay_window", replay_window, MIN_REPLAY_WINDOW, MAX_REPLAY_WINDOW)
        self._max_epochs = check_int("max_epochs", max_epochs, 1, None)
        self._windows: dict[int, ReplayWindow] = {}
        self._floor = 0        # entries of epochs below it are refused (their windows were dropped)
        self._lock = threading.Lock()

    @property
    def window_count(self) -> int:
        """Replay windows held (one per epoch whose entries this decryptor opened, at most ``max_epochs``)."""
        return len(self._windows)

    def _admit_epoch(self, epoch: int) -> ReplayWindow:
        """A new window for ``epoch`` (called with the lock held, after its entry authenticated)."""
        if len(self._windows) >= self._max_epochs:
            live = set(self.session.live_epochs) if self.session.is_valid() else set()
            for e in [e for e in self._windows if e not in live]:
                del self._windows[e]            # retired: nothing of that epoch can be opened any more
        if len(self._windows) >= self._max_epochs:
            oldest = min(self._windows)
            if epoch < oldest:
                raise NonceReplayError(
                    f"epoch {epoch} is older than the {self._max_epochs} epochs whose replay windows "
                    f"this decryptor keeps; refused")
            del self._windows[oldest]
            self._floor = oldest + 1
        window = self._windows[epoch] = ReplayWindow(self._window_size)
        return window

    def decrypt_entry(self, entry: EncryptedEntry) -> KVCacheEntry:
        """Open one entry (see the class docstring for the errors)."""
        if not isinstance(entry, EncryptedEntry):
            raise TypeError(f"entry must be an EncryptedEntry, got {type(entry).__name__}")
        try:
            entry.validate()
        except MalformedEntryError:
            raise
        except Exception as exc:  # wrong field types in a hand-built entry
            raise MalformedEntryError(f"malformed entry: {exc}") from None
        s = self.session
        m = entry.metadata
        _check_owner(s, m, "decrypt")
        if not entry.nonce_matches():
            # the nonce is not bound into the AAD; the counter it carries must be the entry's own
            raise DecryptionError(
                f"nonce does not match epoch {entry.epoch} and sequence number {entry.sequence_number} "
                f"for tenant {m.tenant_id!r}, layer {m.layer_idx}, positions {m.positions.start}..{m.positions.stop - 1}",
                tenant_id=m.tenant_id, layer_idx=m.layer_idx, positions=m.positions)
        with self._lock:
            # the key first: an epoch the session has no key for never gets a replay window
            try:
                cipher = s.cipher(entry.epoch)
            except DecryptionError as exc:
                raise DecryptionError(f"{exc}; layer {m.layer_idx}, positions {m.positions.start}..{m.positions.stop - 1}",
                                      tenant_id=m.tenant_id, layer_idx=m.layer_idx, positions=m.positions) from None
            if entry.epoch < self._floor:
                raise NonceReplayError(
                    f"epoch {entry.epoch} is older than the {self._max_epochs} epochs whose replay windows "
                    f"this decryptor keeps; refused")
            window = self._windows.get(entry.epoch)
            if window is not None:
                window.check(entry.sequence_number)
            try:
                plain = cipher.decrypt(entry.nonce_bytes, entry.ciphertext_bytes, entry.aad())
            except InvalidTag:
                raise DecryptionError(
                    f"authentication failed for tenant {m.tenant_id!r}, layer {m.layer_idx}, "
                    f"positions {m.positions.start}..{m.positions.stop - 1}",
                    tenant_id=m.tenant_id, layer_idx=m.layer_idx, positions=m.positions) from None
            if window is None:
                window = self._admit_epoch(entry.epoch)
            window.mark(entry.sequence_number)
        return KVCacheEntry(m, plain[:entry.key_len], plain[entry.key_len:])

    decrypt = decrypt_entry
