"""The toy world's tokenizer: a `CLIPTokenizer` whose vocabulary is the world's words, one token each."""

from __future__ import annotations

from .scenes import COLORS, PROMPT_WORDS, SHAPES, TEXTURES


def world_words() -> list[str]:
    """Every word of class names, captions and prompts, sorted."""
    words = set(PROMPT_WORDS) | set(COLORS) | set(TEXTURES) | set(SHAPES)
    return sorted(words)


def build_tokenizer(model_max_length: int = 32):
    """A `CLIPTokenizer` whose vocabulary is the world's words: the characters, every word as one `word</w>` token
    and the BPE merges that build each word from its characters (so each known word is exactly one token;
    punctuation is a token of its own; unknown words fall back to characters)."""
    chars = sorted({ch for w in world_words() for ch in w} | set(",.!?'-"))
    order = sorted(world_words(), key=lambda w: (-len(w), w))  # long words first: their merges win
    for _ in range(len(order)):  # a word broken by another word's merges moves to the front, until none is
        tokenizer = _bpe_tokenizer(chars, order, model_max_length)
        bad = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not bad:
            return tokenizer
        order = bad + [w for w in order if w not in bad]
    raise RuntimeError(f"could not build single-token merges for {bad}")


def _bpe_tokenizer(chars, words, model_max_length):
    from transformers import CLIPTokenizer

    tokens = list(chars) + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
