"""EncryptedCache across the supported transformers releases (5.16 to 5.25), and what users of
transformers do with a cache: pass it as ``past_key_values=`` (or ``cache=`` where generate knows it),
``copy.deepcopy`` a prompt's cache to reuse it, hand it to a ``text-generation`` pipeline."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

import pqc_kv_cache.cache.cache as cache_module
from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import SessionClosedError
from support.cache_models import VOCAB, generate, prompts, sessions, tiny_model

TF = Version(transformers.__version__)


def forward(model, ids, cache):
    """One forward pass that fills ``cache`` (the keyword every supported release's forward accepts)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        return model(input_ids=ids, past_key_values=cache, use_cache=True)


# ---- layer types ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["one dict (5.16-5.18)", "a dict per layer (5.19+)"])
def test_layer_types_are_read_from_either_kwargs_shape(shape, monkeypatch):
    types = ["sliding_attention", "full_attention", "chunked_attention"]
    per_layer = [{"sliding_window": 6}, {}, {"sliding_window": 6}]
    kwargs = {"sliding_window": 6} if shape.startswith("one") else per_layer
    monkeypatch.setattr(cache_module, "get_layer_types_and_kwargs", lambda cfg: (types, kwargs))
    cache = EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"))
    assert [(layer.layer_idx, layer.sliding_window) for layer in cache.layers] == [(0, 6), (1, None), (2, 6)]


@pytest.mark.parametrize("kind", ["linear_attention", "dummy", "hybrid_sliding", "compressed_sparse_attention"])
def test_unsupported_layer_types_are_refused_before_any_layer_exists(kind, monkeypatch):
    monkeypatch.setattr(cache_module, "get_layer_types_and_kwargs",
                        lambda cfg: (["full_attention", kind], [{}, {"sliding_window": 4}]))
    with pytest.raises(ValueError, match=f"layer 1 is '{kind}'"):
        EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"))


@pytest.mark.parametrize("window", [None, 0, "8"])
def test_a_sliding_layer_without_a_usable_window_is_refused(window, monkeypatch):
    monkeypatch.setattr(cache_module, "get_layer_types_and_kwargs",
                        lambda cfg: (["sliding_attention"], {"sliding_window": window}))
    with pytest.raises(ValueError, match="sliding window"):
        EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"))


def test_this_releases_configs_give_one_layer_per_hidden_layer():
    """On whichever transformers is installed: a full and a sliding model lay out every layer."""
    llama, mistral = tiny_model("llama", layers=3), tiny_model("mistral")
    assert [l.sliding_window for l in EncryptedCache(llama.config, sessions=sessions("a")).layers] == [None] * 3
    assert [l.sliding_window for l in EncryptedCache(mistral.config, sessions=sessions("a")).layers] == [8, 8]


def test_a_mixed_full_and_sliding_config_matches_dynamic_cache():
    """Explicit per-layer types (what Gemma- and Qwen2-style configs carry) on this release."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=6, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"], pad_token_id=0, eos_token_id=None)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    cache = EncryptedCache(model.config, sessions=sessions("alice"))
    assert [l.sliding_window for l in cache.layers] == [None, 6]
    ids = prompts(1, 9, seed=21)
    assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=False),
                       generate(model, ids, cache, max_new_tokens=8, do_sample=False))


# ---- crop ------------------------------------------------------------------------------------------
def test_crop_accepts_a_zero_dim_integer_tensor():
    """Assisted and prompt-lookup decoding pass ``-n_matches`` as a 0-d tensor on transformers <= 5.18."""
    model = tiny_model("llama")
    cache, ref = EncryptedCache(model.config, sessions=sessions("alice")), None
    forward(model, prompts(1, 9), cache)
    cache.crop(torch.tensor(-3))
    assert cache.get_seq_length() == 6
    cache.crop(np.int64(-1))
    cache.crop(np.array(-1))
    cache.crop(torch.tensor(0))
    assert cache.get_seq_length() == 4
    for bad in (torch.tensor(-1.0), torch.tensor([-1]), torch.tensor(True), np.array([-1]), -1.0):
        with pytest.raises(TypeError, match="tokens_to_remove"):
            cache.crop(bad)
    assert cache.get_seq_length() == 4 and ref is None


# ---- the generate keyword -------------------------------------------------------------------------
def test_past_key_values_keyword_matches_dynamic_cache_on_this_release():
    model = tiny_model("llama")
    ids = prompts(2, 7, seed=22)
    out = generate(model, ids, EncryptedCache(model.config, sessions=sessions("alice", "bob")),
                   max_new_tokens=6, do_sample=False)
    assert torch.equal(generate(model, ids, max_new_tokens=6, do_sample=False), out)


@pytest.mark.skipif(TF < Version("5.24"), reason="generate(cache=...) exists from transformers 5.24")
def test_cache_keyword_where_generate_has_it():
    model = tiny_model("llama")
    ids = prompts(2, 7, seed=23)
    cache = EncryptedCache(model.config, sessions=sessions("alice", "bob"))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=6,
                             do_sample=False)
    assert torch.equal(generate(model, ids, max_new_tokens=6, do_sample=False), out)
    assert cache.get_seq_length() == ids.shape[1] + 5


# ---- copy.deepcopy --------------------------------------------------------------------------------
def test_deepcopy_shares_sessions_and_copies_ciphertext_and_scratch():
    model = tiny_model("llama")
    alice, bob = sessions("alice", "bob")
    audit = KVAuditLog()
    cache = EncryptedCache(model.config, sessions=[alice, bob], audit=audit)
    forward(model, prompts(2, 6), cache)
    dup = copy.deepcopy(cache)
    assert dup.sessions[0] is alice and dup.sessions[1] is bob
    assert dup.audit is audit and dup.backend is cache.backend
    for a, b in zip(cache.layers, dup.layers):
        assert b._ctx is dup._ctx and a._ctx is cache._ctx and a._ctx is not b._ctx
        assert b.arena.buffer.data_ptr() != a.arena.buffer.data_ptr() and torch.equal(a.ciphertext, b.ciphertext)
        assert b.keys is None and b.values is None
    assert dup._scratch is None and cache._scratch is not None
    with pytest.raises(TypeError, match="copied with its cache"):
        copy.deepcopy(cache.layers[0])
    audit.close()


def test_no_key_nonce_pair_is_sealed_twice_by_a_cache_and_its_copy():
    model = tiny_model("llama")
    two = sessions("alice", "bob")
    host = HostBackend(threads=1)
    sealed: dict[tuple, int] = {}

    class Recording(HostBackend):
        """Every (key, nonce) either cache seals with (the backend is shared by the copy)."""

        def encrypt_chunks(self, keys, layout, chunks, *args, **kwargs):
            for slot, counter in zip(np.asarray(chunks.slot).tolist(), np.asarray(chunks.counter).tolist()):
                pair = (keys[slot].key, keys[slot].epoch, counter)
                sealed[pair] = sealed.get(pair, 0) + 1
            return host.encrypt_chunks(keys, layout, chunks, *args, **kwargs)

    cache = EncryptedCache(model.config, sessions=two, backend=Recording(threads=1), merge_min_segments=2)
    ids = prompts(2, 8, seed=24)
    forward(model, ids, cache)
    copies = [copy.deepcopy(cache), copy.deepcopy(cache)]
    follow = [torch.cat([ids, prompts(2, n, seed=25 + n)], 1) for n in (2, 3, 4)]
    for c, f in zip([cache, *copies], follow):      # each continues on its own: decode, merge, crop, rotate
        generate(model, f, c, max_new_tokens=5, do_sample=False)
        c.crop(-2)
        c.rotate("bob")
    assert sealed and max(sealed.values()) == 1, [p[1:] for p, n in sealed.items() if n > 1]
    # the same (session, epoch, counter) in two caches is the same chunk, never two different ones
    seen: dict[tuple, tuple] = {}
    for c in (cache, *copies):
        for li in range(len(c.layers)):
            for row in range(2):
                for e in c.export_entries(li, row):
                    key = (e.metadata.session_id, e.epoch, e.sequence_number)
                    assert seen.setdefault(key, (e.aad(), e.ciphertext)) == (e.aad(), e.ciphertext), key


def test_closing_a_session_shreds_its_rows_in_the_copy_too():
    model = tiny_model("llama")
    alice, bob = sessions("alice", "bob")
    cache = EncryptedCache(model.config, sessions=[alice, bob])
    forward(model, prompts(2, 6), cache)
    dup = copy.deepcopy(cache)
    forward(model, prompts(2, 1, seed=26), dup)         # the copy has plaintext in its own scratch
    bob.close()
    for c in (cache, dup):
        assert not c._scratch.any()
        for layer in c.layers:
            for seg in range(layer.num_segments):
                off, n = int(layer.table.offset[seg, 1]), int(layer.chunk_sizes()[seg])
                assert not layer.arena.buffer[off:off + n].any()
        with pytest.raises(SessionClosedError):
            forward(model, prompts(2, 1, seed=27), c)


def test_a_rotation_in_a_copy_reseals_the_original_too():
    """One session, one set of live keys: rotating in the copy moves the original's chunks to the new
    epoch before the old key is erased, so both keep generating like deep-copied DynamicCaches."""
    from transformers import DynamicCache
    model = tiny_model("llama")
    alice, = sessions("alice")
    audit = KVAuditLog()
    ids = prompts(1, 6, seed=28)
    cache, ref = EncryptedCache(model.config, sessions=[alice], audit=audit), DynamicCache(config=model.config)
    forward(model, ids, cache)
    forward(model, ids, ref)
    dup, ref_dup = copy.deepcopy(cache), copy.deepcopy(ref)
    assert dup.rotate("alice") == [1]
    assert alice.live_epochs == [1]
    for c in (cache, dup):
        assert {int(e) for layer in c.layers for e in layer.table.epoch.reshape(-1)} == {1}
    for c, r, n in ((dup, ref_dup, 2), (cache, ref, 3)):
        follow = torch.cat([ids, prompts(1, n, seed=29)], 1)
        assert torch.equal(generate(model, follow, r, max_new_tokens=5, do_sample=False),
                           generate(model, follow, c, max_new_tokens=5, do_sample=False))
    audit.flush()
    rot = audit.entries(limit=None, operation="rotate", tenant_id="alice")
    assert len([e for e in rot if e.layer_idx >= 0]) >= 2 * 2   # 2 layers x 2 caches
    audit.close()


# ---- pipeline -------------------------------------------------------------------------------------
def word_tokenizer():
    """A whitespace word-level tokenizer over the tiny models' vocabulary, built in memory (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")      # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_text_generation_pipeline_with_an_encrypted_cache_matches_the_default(kind):
    from transformers import pipeline
    model = tiny_model(kind)
    pipe = pipeline("text-generation", model=model, tokenizer=word_tokenizer(), device="cpu")
    text = "w5 w9 w12 w40 w7 w33 w8 w61 w17 w4"
    audit = KVAuditLog()
    cache = EncryptedCache(model.config, sessions=sessions("alice"), audit=audit)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        ref = pipe(text, max_new_tokens=8, do_sample=False, return_tensors=True)
        out = pipe(text, max_new_tokens=8, do_sample=False, return_tensors=True, past_key_values=cache)
    assert out == ref and len(out[0]["generated_token_ids"]) == 10 + 8
    # a cache belongs to one call (as a DynamicCache does): the next prompt gets a fresh one
    other = "w3 w14 w15 w92 w26"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        fresh = EncryptedCache(model.config, sessions=sessions("bob"), audit=audit)
        assert pipe(other, max_new_tokens=4, do_sample=False, return_tensors=True, past_key_values=fresh) == \
            pipe(other, max_new_tokens=4, do_sample=False, return_tensors=True)
    assert cache.get_seq_length() == 10 + 7
    assert all(layer.keys is None for layer in cache.layers)
    audit.flush()
    assert len(audit.entries(limit=None, operation="encrypt", tenant_id="alice")) == 2 * (10 + 7)
    audit.close()
