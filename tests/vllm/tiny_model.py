"""A tiny random Llama and a locally trained tokenizer, saved for vLLM to load offline."""

import os


VOCAB = 512          # the tokenizer's 403 entries, padded


def save_tiny_llama(directory: str, max_positions: int = 512, *, layers: int = 2, hidden: int = 128,
                    heads: int = 4, kv_heads: int = 4, head_dim: int | None = None,
                    intermediate: int = 256) -> str:
    """The model and tokenizer in ``directory``; ``max_positions``: the longest sequence vLLM may run on it
    (its weights do not depend on it: positions are rotary). The other arguments give the model's shape
    (``head_dim``: ``hidden // heads`` when None); the defaults are the tiny 2-layer model the tests use.
    Weights are random (seeded) whatever the shape; the vocabulary is the tokenizer's either way."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(400)]
    tok.train_from_iterator([" ".join(words)] * 2, trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim if head_dim is not None else hidden // heads,
                      max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():                       # wide logits: greedy picks are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory
