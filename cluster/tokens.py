"""Token shards: the files prepare_tokens.py writes and gpt_fsdp.py reads by memory map (docs/gpt.md).

A shard is llm.c's layout: a header of 256 little-endian int32, then the tokens as little-endian uint16.
    header[0] 20240520 (the magic number), header[1] 1 (the version: uint16 tokens), header[2] the number of tokens,
    header[3] the vocabulary size and header[4] the bytes of text the tokens encode (both ours: 0 where not recorded,
    as in llm.c's own files). The rest are 0.
So llm.c's GPT-2 shards (fineweb, tinyshakespeare) load here as they are, and ours load in llm.c. A shard that is not
one, or is cut short, is one ERROR line that names the file and what is wrong (read_shard)."""
import importlib
import mmap
import os
import struct

import torch

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
GPT2_VOCAB = 50257  # what a shard without header[3] (llm.c's) holds: GPT-2's tokens


class ShardError(ValueError):
    """A file that is not a whole token shard; its message names the file and what is wrong."""


def write_shard(path, tokens, vocab_size, text_bytes):
    """`tokens` (a 1-D integer tensor, every id below 65,536) as a shard at `path`, atomically (a temporary file,
    then a rename)."""
    if tokens.numel() and int(tokens.max()) >= 2 ** 16:
        raise ShardError(f"{path}: token {int(tokens.max())} does not fit in uint16 (at most 65,535)")
    header = [MAGIC, VERSION, tokens.numel(), vocab_size, text_bytes] + [0] * (HEADER_INTS - 5)
    if text_bytes >= 2 ** 31:
        raise ShardError(f"{path}: {text_bytes} bytes of text do not fit the header's int32: write smaller shards")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack(f"<{HEADER_INTS}i", *header))
        f.write(tokens.to(torch.int32).numpy().astype("<u2").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path):
    """(its tokens, a uint16 tensor over a memory map of the file: nothing is read until used, and every process on a
    node shares the pages; its header as a dict). ShardError for a file that is not a whole shard."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path} is not a token shard: {size} bytes, less than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        header = struct.unpack(f"<{HEADER_INTS}i", f.read(HEADER_BYTES))
        if header[0] != MAGIC:
            raise ShardError(f"{path} is not a token shard: it starts with {header[0]}, not the magic number {MAGIC}"
                             " (llm.c's layout). HINT: make shards from text with prepare_tokens.py")
        if header[1] != VERSION:
            raise ShardError(f"{path} is a version {header[1]} shard; only version {VERSION} (uint16 tokens) is read "
                             "here. HINT: llm.c's version 2 holds uint32 tokens (Llama 3's vocabulary)")
        count, expected = header[2], HEADER_BYTES + 2 * header[2]
        if size != expected:
            raise ShardError(f"{path} is {'cut short' if size < expected else 'longer than its header says'}: its "
                             f"header says {count:,} tokens ({expected:,} bytes), the file has {size:,} bytes. HINT: "
                             "copy it again, or rerun prepare_tokens.py")
        # a private (copy-on-write) map: torch gets a writable buffer, and pages are read from the file when used
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if count else bytearray(HEADER_BYTES)
    tokens = torch.frombuffer(buffer, dtype=torch.uint16, count=count, offset=HEADER_BYTES)
    return tokens, {"tokens": count, "vocab_size": header[3] or GPT2_VOCAB, "text_bytes": header[4]}


class Tokenizer:
    """encode(text) -> token ids, decode(ids) -> text, and how many tokens there are (vocab_size)."""

    def __init__(self, spec, encode, decode, vocab_size, end=None):
        self.spec, self.encode, self.decode, self.vocab_size = spec, encode, decode, vocab_size
        self.end = [] if end is None else [end]  # the end-of-text token put between documents, where there is one


def tokenizer(spec):
    """The tokenizer that `spec` names: "bytes" (the default: a token per byte of UTF-8, 256 of them, nothing to
    download), or MODULE:FUNCTION[:ARGUMENT], a function (dotted names allowed) that returns an object with
    encode(text), decode(ids), and n_vocab or vocab_size (and eot_token, if it has one): "tiktoken:get_encoding:gpt2",
    "transformers:AutoTokenizer.from_pretrained:PATH", or a module of your own."""
    if spec == "bytes":
        return Tokenizer(spec, lambda text: list(text.encode("utf-8") if isinstance(text, str) else text),
                         lambda ids: bytes(ids).decode("utf-8", errors="replace"), 256)
    module, _, rest = spec.partition(":")
    name, _, argument = rest.partition(":")
    if not module or not name:
        raise ValueError(f"--tokenizer {spec}: give 'bytes' or MODULE:FUNCTION[:ARGUMENT]")
    made = importlib.import_module(module)
    for part in name.split("."):
        made = getattr(made, part)
    made = made(argument) if argument else made()
    vocab = getattr(made, "n_vocab", None) or getattr(made, "vocab_size", None) or len(made)
    if vocab > 2 ** 16:
        raise ValueError(f"--tokenizer {spec} has {vocab:,} tokens: uint16 shards hold at most 65,536")
    return Tokenizer(spec, made.encode, made.decode, vocab, getattr(made, "eot_token", None))
