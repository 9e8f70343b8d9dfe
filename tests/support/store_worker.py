"""A process of its own that saves or loads blocks of the connector's store (``KVBlockStore``, the worker side
of the connector) over a real key service, as a second engine on the same host would.

``python -m support.store_worker JSON``: ``{"op": "save" | "load", "store", "socket", "secret" (hex),
"tenant", "session", "prompt" (token ids), "block_size", "seed", "reps"}``; prints one JSON line: for
``save`` the number of files written, for ``load`` the load errors of each repetition and whether every
loaded block equals the saved one (the source blocks are rebuilt from ``seed``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.vllm import KeyClient, ServerSecret
from pqc_kv_cache.vllm.blocks import KVBlockStore, LoadRequest, SavePart, kv_block_views
from pqc_kv_cache.vllm.storefiles import block_file, chain_hashes

HEADS, HD, NB = 2, 8, 16
LAYERS = (0, 1)


def source(seed: int, bs: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(NB, HEADS, bs, 2 * HD, generator=g) for layer in LAYERS}


def main(args: dict) -> dict:
    bs = args["block_size"]
    secret = ServerSecret(bytes.fromhex(args["secret"]))
    chains = chain_hashes(args["prompt"], bs)
    n = len(chains)
    paths = [block_file(args["store"], secret, args["tenant"], args["session"], c) for c in chains]
    src = source(args["seed"], bs)
    with tempfile.TemporaryDirectory() as d:
        log = KVAuditLog(os.path.join(d, "audit.log"))
        try:
            store = KVBlockStore(HostBackend(threads=1), log, KeyClient(args["socket"]), bs, "cpu")
            if args["op"] == "save":
                written = 0
                for r in range(args["reps"]):
                    sp = [SavePart(f"s{r}", args["tenant"], args["session"], list(range(n)), list(range(n)), chains,
                                   paths)]
                    store.begin_step(sp, len(LAYERS))
                    for layer in LAYERS:
                        store.save_layer(layer, src[layer], sp)
                    written += len(store.finish_saves(sp, LAYERS))
                return {"written": written}
            errors, equal = [], True
            dst_ids = list(range(NB - n, NB))
            for r in range(args["reps"]):
                dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
                lr = LoadRequest(f"l{r}", args["tenant"], args["session"], dst_ids, list(range(n)), chains, paths)
                store.begin_step([], len(LAYERS))
                store.load([lr], [(layer, dst[layer]) for layer in LAYERS])
                errors.append(sorted(store.load_errors()))
                for layer in LAYERS:
                    ks, vs = kv_block_views(src[layer], "cpu")
                    kd, vd = kv_block_views(dst[layer], "cpu")
                    equal = equal and all(torch.equal(kd[b], ks[i]) and torch.equal(vd[b], vs[i])
                                          for i, b in enumerate(dst_ids))
            return {"errors": errors, "equal": equal}
        finally:
            log.close(timeout=10)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
