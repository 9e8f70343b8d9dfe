"""A process of its own that saves or loads blocks of the connector's store (``KVBlockStore``, the worker side
of the connector) over a real key service, as a second engine on the same host would.

``python -m support.store_worker JSON``: ``{"op": "save" | "load", "store", "socket", "secret" (hex),
"tenant", "session", "prompt" (token ids), "block_size", "seed", "reps"}``; prints one JSON line: for
``save`` the number of files written, for ``load`` the load errors of each repetition and whether every
loaded block equals the saved one (the source blocks are rebuilt from ``seed``).

Optional keys, for a worker on another host: ``"tls"`` (the worker's CA, certificate and key files; ``socket``
is then ``tls://HOST:PORT``) and ``"token"`` (the engine token's file). ``"first"``: a save stores the
prompt's blocks from this index on (a chat's next turn), and ``"sealed"`` in its answer lists ``[epoch,
counter, key hex]`` of every chunk written (the key fetched from the key service). ``"lookup"``: a load does
what the connector's scheduler side does, loading only the longest run of leading blocks that are on disk,
and ``"hit"`` in its answer is how many that was.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.vllm import KeyClient, MutualTLS, ServerSecret, load_engine_token
from pqc_kv_cache.vllm.blocks import TAG, KVBlockStore, LoadRequest, SavePart, kv_block_views
from pqc_kv_cache.vllm.storefiles import block_file, chain_hashes, read_block

HEADS, HD, NB = 2, 8, 16
LAYERS = (0, 1)


def source(seed: int, bs: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(NB, HEADS, bs, 2 * HD, generator=g) for layer in LAYERS}


def _sealed(client: KeyClient, args: dict, paths: list[str], bs: int) -> list[list]:
    """[epoch, counter, key hex] of every chunk in the block files ``paths``."""
    chunk_len = bs * 2 * HEADS * HD * 4 + TAG
    out, keys = [], {}
    for path in paths:
        header, _, _ = read_block(path, chunk_len)
        for e in header["layers"]:
            if e["epoch"] not in keys:
                keys[e["epoch"]] = client.key(args["tenant"], args["session"], e["epoch"]).hex()
            out.append([e["epoch"], e["counter"], keys[e["epoch"]]])
    return out


def main(args: dict) -> dict:
    bs = args["block_size"]
    secret = ServerSecret(bytes.fromhex(args["secret"]))
    chains = chain_hashes(args["prompt"], bs)
    paths = [block_file(args["store"], secret, args["tenant"], args["session"], c) for c in chains]
    if args.get("lookup"):        # the scheduler side's hit: the longest run of leading blocks on disk
        hit = next((i for i, p in enumerate(paths) if not os.path.isfile(p)), len(paths))
        chains, paths = chains[:hit], paths[:hit]
    n = len(chains)
    src = source(args["seed"], bs)
    token = load_engine_token(args["token"]) if args.get("token") else None
    client = KeyClient(args["socket"], token=token, tls=MutualTLS(*args["tls"]) if args.get("tls") else None)
    with tempfile.TemporaryDirectory() as d:
        log = KVAuditLog(os.path.join(d, "audit.log"))
        try:
            store = KVBlockStore(HostBackend(threads=1), log, client, bs, "cpu")
            if args["op"] == "save":
                written, first = [], args.get("first", 0)
                ids = list(range(first, n))
                for r in range(args["reps"]):
                    sp = [SavePart(f"s{r}", args["tenant"], args["session"], ids, ids, chains[first:], paths[first:])]
                    store.begin_step(sp, len(LAYERS))
                    for layer in LAYERS:
                        store.save_layer(layer, src[layer], sp)
                    written += store.finish_saves(sp, LAYERS)
                if "first" in args:
                    return {"written": len(written), "sealed": _sealed(client, args, written, bs)}
                return {"written": len(written)}
            errors, equal = [], True
            dst_ids = list(range(NB - n, NB))
            for r in range(args["reps"]):
                dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
                lr = LoadRequest(f"l{r}", args["tenant"], args["session"], dst_ids, list(range(n)), chains, paths)
                store.begin_step([], len(LAYERS))
                if n:
                    store.load([lr], [(layer, dst[layer]) for layer in LAYERS])
                errors.append(sorted(store.load_errors()))
                for layer in LAYERS:
                    ks, vs = kv_block_views(src[layer], "cpu")
                    kd, vd = kv_block_views(dst[layer], "cpu")
                    equal = equal and all(torch.equal(kd[b], ks[i]) and torch.equal(vd[b], vs[i])
                                          for i, b in enumerate(dst_ids))
            return {"errors": errors, "equal": equal, **({"hit": n} if args.get("lookup") else {})}
        finally:
            log.close(timeout=10)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
