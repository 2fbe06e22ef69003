"""Turn text files into the token shards that gpt_fsdp.py trains on:

    python prepare_tokens.py                                   # Python's own standard library (.py files), as bytes
    python prepare_tokens.py ~/corpus --pattern '*.txt'        # your text: every *.txt under ~/corpus
    python prepare_tokens.py ~/corpus --tokenizer tiktoken:get_encoding:gpt2   # GPT-2's tokens (pip install tiktoken)

Run it once, on the login node (it is one process), into a folder every node can read: --out-dir (default
$DATA_DIR/tokens, else ./data/tokens). It writes val_000000.bin (the first --val-tokens tokens), then train_000000.bin,
train_000001.bin, ... of --shard-tokens each, and tokenizer.txt, which names the tokenizer for gpt_fsdp.py's samples.
The files are shuffled first (a fixed order), so that validation holds a fair share of them. The format is llm.c's
(cluster/tokens.py): its shards load here unchanged.
"""
import argparse
import fnmatch
import os
import random
import sysconfig
import time

try:
    import cluster  # the shard format lives in cluster/tokens.py, beside the reader gpt_fsdp.py calls
except ModuleNotFoundError as e:
    raise SystemExit(f"ERROR: {__file__} needs the cluster/ folder beside it: copy it from the same repository") \
        if e.name == "cluster" else e from None

import torch
from cluster import tokens as shards


def get_args(argv=None):
    p = argparse.ArgumentParser(description="text files -> token shards (llm.c's layout) for gpt_fsdp.py")
    p.add_argument("inputs", nargs="*", help="text files, or folders to search for --pattern (default: the .py files "
                                             "of Python's standard library, which every machine has)")
    p.add_argument("--pattern", default="*.txt", help="file names to take from folders (default: *.txt; *.py for "
                                                      "the standard library)")
    p.add_argument("--out-dir", default=os.path.join(os.environ.get("DATA_DIR", "./data"), "tokens"),
                   help="where the shards go (default: $DATA_DIR/tokens, else ./data/tokens)")
    p.add_argument("--tokenizer", default="bytes",
                   help="bytes, or MODULE:FUNCTION[:ARGUMENT] returning an object with encode, decode and n_vocab "
                        "or vocab_size, e.g. tiktoken:get_encoding:gpt2 (default: bytes)")
    p.add_argument("--val-tokens", type=cluster.positive_int, default=1_000_000,
                   help="tokens set apart for validation (default: 1,000,000)")
    p.add_argument("--shard-tokens", type=cluster.positive_int, default=100_000_000,
                   help="tokens per training shard, as llm.c's (default: 100,000,000)")
    args = p.parse_args(argv)
    if not args.inputs:
        args.inputs, args.pattern = [sysconfig.get_paths()["stdlib"]], "*.py"  # its installed packages aside
    return args


SKIP = {"site-packages", "dist-packages", "__pycache__"}  # folders never searched: installed packages, bytecode


def text_files(inputs, pattern):
    """Every file named, and every file under the folders named whose name matches `pattern`, in a fixed order."""
    found = []
    for path in inputs:
        if os.path.isfile(path):
            found.append(path)
            continue
        if not os.path.isdir(path):
            raise SystemExit(f"ERROR: {path} is neither a file nor a folder")
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = sorted(set(subfolders) - SKIP)
            found += [os.path.join(folder, n) for n in sorted(names) if fnmatch.fnmatch(n, pattern)]
    if not found:
        raise SystemExit(f"ERROR: no files matching {pattern} in {' '.join(inputs)}. HINT: --pattern '*.md'")
    random.Random(0).shuffle(found)  # validation takes the first tokens: a fair sample of the files, not one corner
    return found


def main(args):
    try:
        tok = shards.tokenizer(args.tokenizer)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise SystemExit(f"ERROR: --tokenizer {args.tokenizer}: {type(e).__name__}: {e}") from None
    files = text_files(args.inputs, args.pattern)
    os.makedirs(args.out_dir, exist_ok=True)
    t0, written = time.perf_counter(), []
    pending, pending_bytes = [], 0  # tokens not yet written (a tensor per file) and the bytes of text they encode

    def write(final=False):
        """Write whole shards from the pending tokens (the first: validation's); final: the rest too."""
        nonlocal pending, pending_bytes
        ids = torch.cat(pending) if pending else torch.zeros(0, dtype=torch.int32)
        while True:
            limit = args.val_tokens if not written else args.shard_tokens
            if len(ids) < limit and not (final and len(ids)):
                break
            n = min(limit, len(ids))
            name = "val_000000.bin" if not written else f"train_{len(written) - 1:06d}.bin"
            share = round(pending_bytes * n / len(ids))  # the bytes of text these tokens encode, pro rata
            shards.write_shard(os.path.join(args.out_dir, name), ids[:n], tok.vocab_size, share)
            written.append((name, n))
            ids, pending_bytes = ids[n:], pending_bytes - share
        pending = [ids]

    total = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if args.tokenizer == "bytes":  # fast: the file's bytes are its tokens
            ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32) if data else torch.zeros(0)
        else:  # the end-of-text token (tiktoken's eot_token) between documents, where the tokenizer has one
            ids = torch.tensor(tok.encode(data.decode("utf-8", errors="replace")) + tok.end, dtype=torch.int32)
        pending.append(ids.to(torch.int32))
        pending_bytes, total = pending_bytes + len(data), total + len(ids)
        if sum(map(len, pending)) >= args.val_tokens + args.shard_tokens:  # memory: about two shards at most
            write()
    if total <= args.val_tokens:
        raise SystemExit(f"ERROR: {len(files)} files hold {total:,} tokens, not more than --val-tokens "
                         f"({args.val_tokens:,}): nothing left to train on. HINT: a smaller --val-tokens")
    write(final=True)
    with open(os.path.join(args.out_dir, "tokenizer.txt"), "w") as f:
        f.write(args.tokenizer + "\n")
    print(f"{len(files)} files, {total:,} tokens ({args.tokenizer}, {tok.vocab_size} in the vocabulary) -> "
          f"{args.out_dir}: {', '.join(f'{name} ({n:,})' for name, n in written)} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(get_args())
