"""Test doubles of the audit pipeline shared by the audit and backend tests.

- ``HostTensorRing``: CudaAuditRing over host tensors (its three device calls replaced), so the ring's
  host-side bookkeeping and its torch record layout run without a GPU; ``attach`` feeds one into a log.
- ``FakeRing`` / ``FakeLog``: what a backend sees of an audit log (``cuda_ring``, ``emit``,
  ``tenant_id_of``), recording what it is given.
- ``fill_disk``: a persisted log whose file fails as on a full disk; every later emit raises AuditError.
"""

import contextlib
import errno
import threading

import numpy as np
import torch

from pqc_kv_cache.audit.cuda_ring import CudaAuditRing
from pqc_kv_cache.audit.records import RECORD_DTYPE
from pqc_kv_cache.errors import AuditError


class _Copy:
    def __init__(self, slot, n):
        self.slot, self.n, self.done = slot, n, False


class HostTensorRing(CudaAuditRing):
    """CudaAuditRing over host tensors; copies complete at ``complete()`` (or at once when enqueued)."""

    immediate = False

    def _allocate(self):
        self.buf = torch.zeros((self.capacity, 64), dtype=torch.uint8)
        self.staging = torch.zeros((self.capacity, 64), dtype=torch.uint8)
        self.copies = []
        self.copies_lock = threading.Lock()

    def _enqueue_copy(self, slot, n, after=None):
        c = _Copy(slot, n)
        with self.copies_lock:
            self.copies.append(c)
        if self.immediate:
            self.complete()
        return c

    def _copy_done(self, c):
        return c.done

    def complete(self):
        """Complete every copy: the committed batch is published first (what the drain's next pass does)."""
        self.publish()
        with self.copies_lock:
            for c in self.copies:
                if not c.done:
                    self.staging[c.slot:c.slot + c.n].copy_(self.buf[c.slot:c.slot + c.n])
                    c.done = True
        with self._alloc.lock:
            self._alloc.work.notify()


def attach(log, capacity=64, immediate=False):
    ring = HostTensorRing(log.allocator, torch.device("cpu"), capacity)
    ring.immediate = immediate
    return log.attach_ring("host-tensors", ring)



class FakeRing:
    """Test double of the CUDA audit ring: slots reserved as fresh device tensors, record numbers
    dense, reserve / commit bookkeeping."""

    def __init__(self, device, capacity=1 << 14):
        self.device = device
        self.capacity = capacity
        self.views = []
        self.next_no = 500
        self.committed = []

    def reserve(self, n):
        assert 1 <= n <= self.capacity
        view = torch.zeros((n, 64), dtype=torch.uint8, device=self.device)
        self.views.append(view)
        first = self.next_no
        self.next_no += n
        return view, first

    def commit(self, n, first_no=None):
        self.committed.append((first_no, n))

    @contextlib.contextmanager
    def reservation(self, n, *, op=0, tenant_idx=0, session_idx=0, layer=0xFFFF):
        """What the real ring's reservation does, on this fake: commit on exit, ERROR records if the block raises."""
        view, first = self.reserve(n)
        try:
            yield view, first
        except BaseException:
            recs = np.zeros(n, dtype=RECORD_DTYPE)
            recs["record_no"] = first + np.arange(n, dtype=np.uint64)
            recs["op"], recs["status"], recs["layer"], recs["row"] = op, 3, layer, 0xFFFF
            recs["tenant_idx"], recs["session_idx"] = tenant_idx, session_idx
            view.copy_(torch.from_numpy(recs.view(np.uint8).reshape(n, 64)))
            self.commit(n, first)
            raise
        self.commit(n, first)

    @contextlib.contextmanager
    def records_at(self, n, *, op, tenant_idx, session_idx, layer):
        """The real ring's ``records_at`` on this fake: ``reservation`` yielding the slots' address."""
        with self.reservation(n, op=op, tenant_idx=tenant_idx, session_idx=session_idx, layer=layer) as (view, first):
            yield view.data_ptr(), first

    def records(self):
        return torch.cat(self.views).cpu().numpy().view(RECORD_DTYPE).reshape(-1)


class FakeLog:
    def __init__(self, device, capacity=1 << 14):
        self.ring = FakeRing(device, capacity)
        self.emitted = []
        self.tenant_ids = ["tenant-0", "tenant-1"]

    def cuda_ring(self, device):
        return self.ring

    def emit(self, op, **fields):
        self.emitted.append((int(op), fields))

    def tenant_id_of(self, tenant_idx):
        return self.tenant_ids[tenant_idx] if 0 <= tenant_idx < len(self.tenant_ids) else None


def fill_disk(log) -> None:
    """Make the file of persisted KVAuditLog ``log`` fail as on a full disk (ENOSPC), and let the pipeline
    find out: from then on every emit raises AuditError (and so does ``close()``)."""
    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    log._sink.f.write = disk_full
    log.log_event("crop", "disk-full-probe", "probe")     # one record for the drain to fail on
    with contextlib.suppress(AuditError):
        log.flush()
    try:
        log.log_event("crop", "disk-full-probe", "probe")
    except AuditError:
        return
    raise AssertionError("the log did not fail: fill_disk no longer matches how the sink writes")
