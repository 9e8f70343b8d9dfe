"""The static form's GPU check: a decode step captured in a CUDA graph with audit on, replayed 50 times.

What it asks: the tokens of 50 replays are those of ``StaticCache`` under the same capture; every replay
writes its own complete set of records (ENCRYPT and READ per layer and row); no (key, nonce) pair is used
twice; the replay loop makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).

Unverified: written on a machine without a GPU, where it is skipped; it has never run. Both operators have
CUDA implementations (``CudaBackend.seal_static`` and ``open_static``) and ``StaticEncryptedCache`` takes
CUDA tensors; the same cache code runs on the CPU twin of the CUDA backend in ``test_static_twin_cache.py``.
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import StaticCache

from pqc_kv_cache import KVAuditLog, StaticEncryptedCache
from pqc_kv_cache.envelope import split_nonce
from tests.support.cache_models import prompts, sessions, tiny_model
from tests.support.devices import has_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")]

REPLAYS, PROMPT, BATCH, MAX_LEN = 50, 7, 2, 64


def _captured_tokens(model, ids, cache) -> torch.Tensor:
    """Prefill, one eager decode step (the warm-up a capture needs), then one decode step captured and
    replayed REPLAYS times, each replay's greedy token fed to the next on the device; the tokens of the
    replays, [batch, REPLAYS]."""
    dev = ids.device
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(PROMPT, device=dev))
        tok = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([PROMPT], device=dev))
        tok_in = out.logits[:, -1:].argmax(-1).clone()          # the captured step's input buffer
        pos_in = torch.tensor([PROMPT + 1], device=dev)          # and its position
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(input_ids=tok_in, past_key_values=cache, cache_position=pos_in).logits
            nxt = logits[:, -1:].argmax(-1)
        got = torch.zeros(BATCH, REPLAYS, dtype=torch.long, device=dev)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(REPLAYS):
                graph.replay()
                got[:, i:i + 1].copy_(nxt)
                tok_in.copy_(nxt)
                pos_in.add_(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return got.cpu()


def test_a_captured_decode_step_replays_as_static_cache_with_its_own_records_each_time():
    model = tiny_model("llama").cuda()
    ids = prompts(BATCH, PROMPT).cuda()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=MAX_LEN, audit=log)
    # the cache's buffers and state on the device before the first step (a capture allocates nothing new)
    cache.early_initialization(BATCH, cfg.num_key_value_heads, head_dim, torch.float32, torch.device("cuda"))
    want = _captured_tokens(model, ids, StaticCache(cfg, max_cache_len=MAX_LEN))
    got = _captured_tokens(model, ids, cache)
    cache.check()
    assert torch.equal(got, want)

    layers = cfg.num_hidden_layers
    steps = 1 + REPLAYS                      # the warm-up step and the replays (the capture runs nothing)
    enc = log.entries(limit=1_000_000, operation="encrypt")
    read = log.entries(limit=1_000_000, operation="read")
    assert len(enc) == layers * BATCH * (PROMPT + steps)
    assert len(read) == layers * BATCH * (1 + steps)
    # one complete set per replay: every (layer, row) has one ENCRYPT at each position
    per_pos = collections.Counter(e.position for e in enc)
    assert all(per_pos[p] == layers * BATCH for p in range(PROMPT + steps))
    # no (session, epoch, counter) twice, in the records and in the slots
    used = [(e.session_id, e.epoch, e.sequence_number) for e in enc]      # sequence_number: the nonce counter
    assert len(set(used)) == len(used)
    held = []
    for layer in cache.layers:
        for row in range(BATCH):
            s = cache.sessions[int(cache.row_session_slots[row])]
            held += [(s.session_id, *split_nonce(x.nonce_bytes)) for x in layer.export_entries(row, s)]
    assert len(set(held)) == len(held) == layers * BATCH * (PROMPT + steps)
    cache.close()
    log.close()
