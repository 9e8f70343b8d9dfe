"""The EncryptedCache part of ``python -m pqc_kv_cache demo``.

Generates with a two-tenant batch on a tiny random-weight Llama (built from a
config: no download), shows the output is token-identical to transformers'
DynamicCache, prints the audit summary (records per tenant, operation, layer),
runs the working-set mode with the "release when the request ends" pattern,
verifies the persisted audit file, and shows a flipped ciphertext byte being
caught.
"""

from __future__ import annotations

import collections
import os
import tempfile

import torch

__all__ = ["run_cache_demo"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def close_and_verify(audit, path: str, print_fn=print) -> bool:
    """Close ``audit`` (final signed checkpoint and seal) and verify its file at ``path``."""
    from .audit import verify_log

    audit.close()
    print_fn("\n== Verifying the audit file ==")
    rep = verify_log(path)
    again = f" re-opened={rep.reopens}" if rep.reopens else ""
    print_fn(f"  {path}: ok={rep.ok} records={rep.records} closed={rep.closed}{again}"
             + (f" error={rep.error}" if not rep.ok else ""))
    return bool(rep.ok and rep.closed)


def _cache_kw(cache) -> dict:
    """``cache=`` where transformers' generate takes it (5.24 on, where ``past_key_values=`` is
    deprecated), else ``past_key_values=``."""
    import transformers
    from packaging.version import Version
    if Version(transformers.__version__).release >= (5, 24):
        return {"cache": cache}
    return {"past_key_values": cache}


def run_cache_demo(print_fn=print, audit=None) -> int:
    """Run the demo; returns 0 when every check holds, 1 otherwise.

    ``audit``: an open persisted KVAuditLog to record into (left open, the
    caller closes it); when None, a log in a temporary directory, closed and
    verified here.  Only this run's records are counted, so a log that already
    holds records (a continued one) gives the same summary."""
    from .audit import KVAuditLog

    p = print_fn
    tmp = None
    ok = True
    try:
        if audit is None:
            tmp = tempfile.TemporaryDirectory(prefix="pqc_kv_cache_cache_demo_")
            path = os.path.join(tmp.name, "cache.kvlog")
            own = KVAuditLog(path=path)
            try:
                ok = _run(own, p)
            except BaseException:
                own.close()
                raise
            ok &= close_and_verify(own, path, p)
        else:
            ok = _run(audit, p)
    finally:
        if tmp is not None:
            tmp.cleanup()
    p("\nEncryptedCache demo: " + ("all checks passed" if ok else "A CHECK FAILED"))
    return 0 if ok else 1


def _run(audit, print_fn) -> bool:
    from .cache import EncryptedCache
    from .errors import DecryptionError
    from .isolation import TenantIsolationManager
    from .session import TenantIdentity

    p = print_fn
    ok = True
    p("== EncryptedCache: a two-tenant batch through model.generate ==")
    model = _tiny_llama()
    mgr = TenantIsolationManager(audit=audit)
    alice = mgr.create_session(TenantIdentity("alice"))
    bob = mgr.create_session(TenantIdentity("bob"))
    mine = {alice.session_id, bob.session_id}     # this run's records, whatever else the log holds
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0          # bob's prompt is shorter: left padding
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        cache = EncryptedCache(model.config, sessions=[alice, bob], audit=audit)
        enc = model.generate(ids, **_cache_kw(cache), **kw)
    same = torch.equal(plain, enc)
    ok &= same
    p(f"  row 0 -> alice, row 1 -> bob; {enc.shape[1] - ids.shape[1]} new tokens each")
    p(f"  output identical to DynamicCache: {same}")
    layer = cache.layers[0]
    p(f"  layer 0 holds {layer.ciphertext.numel()} bytes of ciphertext in {layer.num_segments} segments; "
      f"layer.keys is {layer.keys}")

    audit.flush()
    entries = [e for e in audit.entries(limit=None) if e.session_id in mine]
    p(f"\n== Audit summary ({len(entries)} records) ==")
    by_tenant = collections.Counter(e.tenant_id for e in entries)
    by_op = collections.Counter(e.operation for e in entries)
    by_layer = collections.Counter(e.layer_idx for e in entries if e.layer_idx >= 0)
    p("  per tenant:    " + ", ".join(f"{k}={v}" for k, v in sorted(by_tenant.items())))
    p("  per operation: " + ", ".join(f"{k}={v}" for k, v in sorted(by_op.items())))
    p("  per layer:     " + ", ".join(f"{k}={v}" for k, v in sorted(by_layer.items())))
    if by_op.get("reseal"):
        p("  (reseal records are segment merges: positions already written, re-sealed as one chunk)")
    written = enc.shape[1] - 1
    want = model.config.num_hidden_layers * 2 * written
    got = by_op.get("encrypt", 0)
    p(f"  encrypt records = layers x rows x positions written: {got} = 2 x 2 x {written}: {got == want}")
    ok &= got == want

    ok &= _run_working_set(model, ids, mask, plain, [alice, bob], audit, mine, p)

    p("\n== A flipped ciphertext byte ==")
    off = int(layer.table.offset[0, 1])          # bob's prefill chunk in layer 0
    layer.ciphertext[off + 5] ^= 0x01
    follow = torch.cat([enc, torch.randint(2, 256, (2, 1), generator=g)], dim=1)
    try:
        with torch.no_grad():
            model.generate(follow, **_cache_kw(cache), attention_mask=torch.cat(
                [mask, torch.ones(2, follow.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1),
                max_new_tokens=2, do_sample=False)
        p("  NOT caught: generation went on with a changed chunk")
        ok = False
    except DecryptionError as exc:
        p(f"  caught: {exc}")
    failed = [e for e in audit.entries(limit=None, operation="decrypt", success=False) if e.session_id in mine]
    p(f"  failed-decrypt records in the audit log: {len(failed)} (tenant {sorted({e.tenant_id for e in failed})})")
    ok &= bool(failed)
    mgr.close()
    return ok


def _run_working_set(model, ids, mask, plain, sessions, audit, mine, print_fn) -> bool:
    """The working-set mode: plaintext on the device while generating, released when the request ends."""
    from .cache import EncryptedCache

    p = print_fn
    p("\n== Working-set mode: release when the request ends ==")
    cache = EncryptedCache(model.config, sessions=sessions, audit=audit, mode="working_set")
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    with torch.no_grad(), cache.generating():       # the plaintext is released when the block ends
        out = model.generate(ids, **_cache_kw(cache), **kw)
        held = cache.layers[0].keys is not None
    same = torch.equal(plain, out)
    p(f"  output identical to DynamicCache: {same}; plaintext held while generating: {held}")
    p(f"  after the block: released={cache.released}, layer.keys is {cache.layers[0].keys}")
    audit.flush()
    ops = collections.Counter(e.operation for e in audit.entries(limit=None)
                              if e.session_id in mine and e.operation in ("read", "release"))
    p(f"  working-set reads recorded: {ops.get('read', 0)}, releases recorded: {ops.get('release', 0)}")
    cache.restore()                                  # the next turn opens the ciphertext once, verified
    p(f"  restore(): every tag verified, plaintext back: {cache.layers[0].keys is not None}")
    cache.close()
    return bool(same and held and ops.get("read") and ops.get("release"))
