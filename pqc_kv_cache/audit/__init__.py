"""Audit pipeline: packed records, host and CUDA rings, asynchronous drain, tamper-evident log.

See docs/audit.md for the record format, the file format and the CLI.
"""

from .log import KVAuditEntry, KVAuditLog
from .records import NONE16, OP_NAMES, RECORD_DTYPE, RECORD_SIZE, Op, Status, op_from_name
from .verify import VerifyReport, verify_log

__all__ = ["KVAuditLog", "KVAuditEntry", "Op", "Status", "NONE16", "RECORD_DTYPE", "RECORD_SIZE", "OP_NAMES",
           "op_from_name", "verify_log", "VerifyReport"]
