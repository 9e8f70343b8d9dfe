"""A tiny random Llama and a locally trained tokenizer, saved for vLLM to load offline."""

import os


def save_tiny_llama(directory: str, max_positions: int = 512) -> str:
    """The model and tokenizer in ``directory``; ``max_positions``: the longest sequence vLLM may run on it
    (its weights do not depend on it: positions are rotary)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(400)]
    tok.train_from_iterator([" ".join(words)] * 2, trainers.WordLevelTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():                       # wide logits: greedy picks are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory
