"""Train a GPT (a decoder-only transformer language model) on token shards with PyTorch's FSDP2, on one process or many:

    python prepare_tokens.py                                  # once: shards of Python's own sources, as bytes
    python gpt_fsdp.py --model=tiny --max-steps=300           # one process (a GPU if there is one, else CPU)
    torchrun --standalone --nproc_per_node=2 gpt_fsdp.py      # 2 processes on this machine
    srun python gpt_fsdp.py                                   # inside a Slurm job, one task per GPU
    sbatch run-gpu8-dist.sh gpt_fsdp.py --model=small         # the job script does the above for you

Copy four things: this script, prepare_tokens.py, the cluster/ folder (the plumbing they call) and a job script.
--data-dir (default $DATA_DIR/tokens, else ./data/tokens) holds the shards that prepare_tokens.py writes (llm.c's
format: its GPT-2 shards of fineweb load as they are). Model sizes: docs/gpt.md, with what fits on one GPU.

Expected (2 CPU processes, gloo; the tiny model on Python's standard library, byte tokens):
    torchrun --standalone --nproc_per_node=2 gpt_fsdp.py --model=tiny --seq-len=128 --batch-size=8 \\
        --batch-tokens=4096 --max-steps=300 --eval-every=100 --lr=3e-3 --warmup-steps=20
    -> 3.05 bits per byte on the 1M validation bytes after 300 steps (1.2M tokens), about 18,800 tokens/s per
       process (2 vCPUs, Intel Xeon; validation takes 45% of its 64 s: lower --val-tokens for quick runs).

Make it yours: the model (SIZES, Block, GPT), the data (the shards, your tokenizer: prepare_tokens.py --tokenizer),
the optimizer and schedule, your own options. Keep the cluster.* calls and the resume block: they make the launchers,
preemption and exact resume work. The data order depends only on --seed and the global step, and the global batch is
--batch-tokens on any number of processes: a checkpoint resumes on another number of GPUs (DCP reshards) with the
same tokens to come. --batch-size is per process and micro-step; gradient accumulation makes up the rest.
"""
import argparse
import hashlib
import math
import os

try:
    import cluster  # the plumbing every script here shares: each line that calls it is one to keep
except ModuleNotFoundError as e:  # first: copied without it, the script stops at once
    raise SystemExit(f"ERROR: {__file__} needs the cluster/ folder beside it: copy it from the same repository") \
        if e.name == "cluster" else e from None

import torch
import torch.nn as nn
import torch.nn.functional as F
from cluster import tokens as shards
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

SIZES = {  # name: (layers, heads, width). GPT-2's are small to xl; parameters with GPT-2's tokens, in docs/gpt.md
    "tiny": (2, 4, 128), "mini": (6, 6, 384), "small": (12, 12, 768), "medium": (24, 16, 1024),
    "large": (36, 20, 1280), "xl": (48, 25, 1600)}


# --- options -----------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description="a GPT on token shards with FSDP2 (fully_shard)")
    positive = cluster.positive_int  # sizes and counts
    p.add_argument("--model", choices=SIZES, default="small", help="model size, by name (default: small, GPT-2's "
                                                                   "124M with its tokens)")
    p.add_argument("--seq-len", type=positive, default=1024, help="tokens per sequence, the context (default: 1024)")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per process and micro-step (default: 8)")
    p.add_argument("--batch-tokens", type=positive, default=2 ** 19,
                   help="tokens per optimizer step over all processes, the global batch: gradient accumulation makes "
                        "it up (default: 524288)")
    p.add_argument("--max-steps", type=positive, default=5000, help="optimizer steps to train (default: 5000)")
    p.add_argument("--lr", type=float, default=6e-4, help="AdamW's peak learning rate (default: 6e-4)")
    p.add_argument("--warmup-steps", type=int, default=100, help="steps of linear warm-up (default: 100)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="on weight matrices only (default: 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip; 0: none (default: 1.0)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the model (default: 0.0)")
    p.add_argument("--eval-every", type=positive, default=250, help="steps between validations (default: 250)")
    p.add_argument("--val-tokens", type=positive, default=2 ** 20,
                   help="validation tokens, the first of the val shards (default: 1048576)")
    p.add_argument("--samples", type=int, default=3, help="texts sampled from the model at the end (default: 3)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default=os.path.join(os.environ.get("DATA_DIR", "./data"), "tokens"),
                   help="the token shards (default: $DATA_DIR/tokens, else ./data/tokens)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 compute with float32 weights, gradient reduction and optimizer, on GPUs that have "
                        "bfloat16 (Ampere on); --no-amp: float32 (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (default: off)")
    # + --log-interval --output-dir --checkpoint-dir --device --profile --dist-timeout, and a job array's sweep line
    return cluster.parse_args(p, argv, log_interval=10)


# --- data --------------------------------------------------------------------
def token_shards(data_dir, split):
    """The split's shards (train_*.bin or val_*.bin in data_dir), memory-mapped, and their headers."""
    names = sorted(n for n in os.listdir(data_dir) if n.startswith(f"{split}_") and n.endswith(".bin")) \
        if os.path.isdir(data_dir) else []
    if not names:
        cluster.fail(f"no {split}_*.bin token shards in {os.path.abspath(data_dir)}. HINT: make them there with: "
                     f"python prepare_tokens.py --out-dir {data_dir}")
    try:
        return [shards.read_shard(os.path.join(data_dir, n)) for n in names]
    except shards.ShardError as e:
        cluster.fail(str(e))


def window_starts(tokens, seq_len, seed, step, count):
    """`count` windows of seq_len + 1 tokens drawn at random over all training shards, by (shard, offset), in an
    order that depends only on the seed and the global step: every rank draws the same, then takes its own share."""
    sizes = torch.tensor([max(len(t) - seq_len, 0) for t in tokens])  # the starts each shard has
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()  # (seed, step) -> a seed: no two pairs share it
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    flat = torch.randint(int(sizes.sum()), (count,), generator=g)
    ends = sizes.cumsum(0)  # where each shard's starts end in the count over all shards
    shard = torch.searchsorted(ends, flat, right=True)
    return list(zip(shard.tolist(), (flat - (ends - sizes)[shard]).tolist(), strict=True))


def batch(tokens, starts, seq_len, device):
    """Inputs and targets (the inputs shifted by one token) for the windows `starts`, on the device."""
    rows = torch.stack([tokens[s][o:o + seq_len + 1].to(torch.int64) for s, o in starts])  # reads the pages now
    if device.type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)
    return rows[:, :-1].to(device), rows[:, 1:].to(device)


# --- model -------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm: attention, then an MLP, each added to the residual stream."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout * self.training)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)), self.dropout, self.training)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, vocab_size, seq_len, layers, heads, width, dropout=0.0):
        super().__init__()
        self.dropout, self.layers, self.width = dropout, layers, width
        self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2's: the output layer is the token embedding
        for name, p in self.named_parameters():  # GPT-2's initialization; the residual projections scaled by depth
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight"))
                                else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = F.dropout(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)), self.dropout,
                      self.training)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def flops_per_token(self, seq_len):
        """A training step's FLOPs per token: 6 per weight of every matrix product (the output layer's included), and
        12 x layers x width x seq_len for attention's two products (the usual count, as PaLM's paper gives it)."""
        matrices = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matrices + 12 * self.layers * self.width * seq_len


@torch.no_grad()
def evaluate(model, val, seq_len, batch_size, val_tokens, bytes_per_token, device):
    """Exact validation loss: the first val_tokens of the val shards in windows of seq_len, each scored once; rank r
    takes windows r, r+W, r+2W, ... and the sums are added. Every rank runs as many forwards (each gathers the
    weights). Bits per byte: the loss in bits over the bytes of text the tokens encode."""
    model.eval()
    windows = [(s, o) for s, t in enumerate(val) for o in range(0, len(t) - seq_len, seq_len)]
    windows = windows[:max(val_tokens // seq_len, 1)]
    mine = windows[cluster.RANK::cluster.WORLD_SIZE]
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum (nats), tokens
    for i in range(0, len(windows[::cluster.WORLD_SIZE]), batch_size):
        x, y = batch(val, mine[i:i + batch_size] or windows[:1], seq_len, device)  # none left: a forward, not scored
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum")
        stats += torch.stack([loss.double(), loss.new_tensor(y.numel(), dtype=torch.float64)]) * bool(mine[i:])
    model.train()
    nats, count = cluster.all_sum(stats).tolist()
    return dict(val_loss=nats / count, val_bpb=nats / math.log(2) / (count * bytes_per_token), val_tokens=int(count))


@torch.no_grad()
def sample(model, prompt, new_tokens, seq_len, seed, device):
    """Continue each prompt row by new_tokens, drawn at temperature 0.8 from the 50 likeliest. Every rank runs the same
    forwards with the same generator, so every rank draws the same tokens."""
    if not prompt:
        return []
    model.eval()
    g = torch.Generator(device).manual_seed(seed)
    x = torch.tensor(prompt, device=device)
    for _ in range(new_tokens):
        logits = model(x[:, -seq_len:])[:, -1].float() / 0.8
        top = logits.topk(min(50, logits.shape[-1]))
        x = torch.cat([x, top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=g))], 1)
    return x[:, len(prompt[0]):].tolist()


# --- training ----------------------------------------------------------------
def train(args, device):
    rank, world_size = cluster.RANK, cluster.WORLD_SIZE
    torch.manual_seed(args.seed)  # same initial weights everywhere: each rank keeps its shard of them
    amp_dtype = torch.bfloat16 if args.amp and device.type == "cuda" and torch.cuda.is_bf16_supported(False) else None
    precision = "bf16 compute, fp32 weights and reduction" if amp_dtype else "fp32"

    # data: every rank maps the shards; the pages come from the file as windows are read (no DataLoader workers)
    (train_tokens, train_headers), (val_tokens, val_headers) = (
        zip(*token_shards(args.data_dir, split), strict=True) for split in ("train", "val"))
    vocab_size, val_header = train_headers[0]["vocab_size"], val_headers[0]
    bytes_per_token = val_header["text_bytes"] / val_header["tokens"] if val_header["text_bytes"] else float("nan")
    decode = str  # the samples at the end: token ids, or text where the tokenizer that made the shards loads here
    spec = os.path.join(args.data_dir, "tokenizer.txt")  # prepare_tokens.py's: which tokenizer that was
    try:
        if os.path.exists(spec):
            decode = shards.tokenizer(open(spec).read().strip()).decode
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        cluster.print0(f"NOTE: the tokenizer in {spec} does not load here ({type(e).__name__}: {e}): the samples at "
                       "the end are token ids")
    per_step = args.batch_size * args.seq_len * world_size  # tokens of one micro-step over all ranks
    if args.batch_tokens % per_step:
        cluster.fail(f"--batch-tokens {args.batch_tokens} is not a multiple of --batch-size x --seq-len x processes "
                     f"({args.batch_size} x {args.seq_len} x {world_size} = {per_step}). HINT: --batch-tokens="
                     f"{max(args.batch_tokens // per_step, 1) * per_step}, or another --batch-size")
    accum = args.batch_tokens // per_step  # micro-steps per optimizer step
    if max(len(t) for t in train_tokens) <= args.seq_len:
        cluster.fail(f"every training shard in {args.data_dir} is shorter than --seq-len {args.seq_len} + 1 tokens")

    # model and optimizer: fully_shard splits each block's weights across the ranks (DTensors). In forward and
    # backward a block's whole weights are gathered just before it runs and freed after; backward reduce-scatters the
    # gradients, so each rank keeps the averaged gradient of its own shard, and AdamW updates (and keeps state for) it
    layers, heads, width = SIZES[args.model]
    raw_model = GPT(vocab_size, args.seq_len, layers, heads, width, args.dropout).to(device)
    cluster.init_weights(args, raw_model)  # --init-from: another run's weights, for a new run
    flops = raw_model.flops_per_token(args.seq_len)  # for the MFU: tests/test_gpt_fsdp.py checks it against torch's
    params = sum(p.numel() for p in raw_model.parameters())
    mixed = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    for block in raw_model.blocks:  # a unit each, then the rest (embeddings, the last norm, the output layer)
        if args.compile:
            block.compile()  # in place: the state_dict's names do not change
        fully_shard(block, mp_policy=mixed)
    fully_shard(raw_model, mp_policy=mixed)
    model = raw_model
    matrices = [p for p in raw_model.parameters() if p.dim() >= 2]  # weight decay on these only, not biases and norms
    others = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    torch.manual_seed(args.seed + rank)  # the weights are made: from here on each rank draws its own random numbers

    def lr_at(step):  # linear warm-up, then cosine decay to a tenth of --lr at --max-steps
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        done = (step - args.warmup_steps) / max(args.max_steps - args.warmup_steps, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))

    # resume: every rank loads its own shards of the newest whole checkpoint, on any number of ranks (DCP reshards;
    # the data order and global batch do not depend on it). Only a checkpoint of this run: what defines it (every
    # option but --batch-size, what is evaluated and sampled, the output folders and the like) is saved and compared
    run = cluster.run_record(args, may_change=("world_size", "batch_size", "eval_every", "val_tokens", "samples"),
                             script=os.path.basename(__file__),
                             model=f"GPT {args.model}, {params:,} parameters",
                             data=f"{sum(map(len, train_tokens)):,} training tokens", precision=precision)
    step = 0  # optimizer steps done: the global step
    ckpt = cluster.load_checkpoint(args.checkpoint_dir, run, device, sharded=True)  # a DCP folder's
    if ckpt:
        model_state, optimizer_state = get_state_dict(raw_model, optimizer)  # this rank's shards, to be filled in
        cluster.load_shards(ckpt, {"model": model_state, "optimizer": optimizer_state})
        set_state_dict(raw_model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        step = ckpt["global_step"]
    # rank 0's metrics file, TensorBoard curves (x: optimizer steps) and --profile
    outputs = cluster.Outputs(args, device, ckpt, purge_step=step + 1, run=run, flops=flops, per="token")

    epoch = 1  # the whole run is one pass: the plumbing names its checkpoints by the step (epoch_0000_step_0000300)

    def checkpoint(epoch, at):
        model_state, optimizer_state = get_state_dict(raw_model, optimizer)  # this rank's shards
        cluster.save_checkpoint(args.checkpoint_dir, epoch, at, device, outputs, {
            "global_step": at or step, "tokens_seen": (at or step) * args.batch_tokens, "args": vars(args),
            "run": run}, shards={"model": model_state, "optimizer": optimizer_state})  # every rank its own (DCP)

    cluster.print0(f"GPT {args.model} ({layers} layers, {heads} heads, width {width}, {params:,} parameters, "
                   f"vocabulary {vocab_size}), FSDP2 over {world_size} processes x {args.batch_size} x "
                   f"{args.seq_len} tokens x {accum} micro-steps = {args.batch_tokens:,} tokens per step | "
                   f"{precision} on {device.type}")

    # training loop
    cluster.stop_check(device, None, 0, 0)  # a signal in start-up, or the end already near
    cluster.TIMES.lap("startup")
    model.train()
    result, first_step, logged = None, step, (step, 0.0)  # the step and training seconds at the last loss line
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per step
    while step < args.max_steps:
        lr = lr_at(step)
        for group in optimizer.param_groups:  # from the step alone: nothing to save, the same on resume
            group["lr"] = lr
        per_rank = args.batch_size * accum
        mine = window_starts(train_tokens, args.seq_len, args.seed, step, per_rank * world_size)
        mine = mine[rank * per_rank:(rank + 1) * per_rank]  # this rank's share of the global batch
        for micro in range(accum):
            x, y = batch(train_tokens, mine[micro * args.batch_size:(micro + 1) * args.batch_size], args.seq_len,
                         device)
            cluster.TIMES.lap("data")
            model.set_requires_gradient_sync(micro == accum - 1)  # reduce-scatter once, after the last micro-step
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / accum  # the policy casts: no autocast
            loss.backward()
            loss_sum += loss.detach()
            cluster.TIMES.lap("compute")
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)  # the norm over all shards
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        outputs.step()  # the profiler's step, with --profile
        if step % args.log_interval == 0 or step == args.max_steps:  # .item() syncs, so only now and then
            value = cluster.all_sum(loss_sum).item() / world_size / (step - logged[0])  # the mean over the steps
            cluster.TIMES.lap("compute")
            seconds = cluster.TIMES.seconds["data"] + cluster.TIMES.seconds["compute"]  # training's, in this run
            rate = (step - logged[0]) * args.batch_tokens / (seconds - logged[1]) / world_size
            cluster.print0(f"step {step}/{args.max_steps} | loss {value:.4f} | lr {lr:.2e} | {rate:,.0f} tokens/s "
                           f"per {'GPU' if device.type == 'cuda' else 'process'}")
            outputs.scalar("train/loss", value, step)
            logged = (step, seconds)
            loss_sum.zero_()
        cluster.TIMES.lap("compute")
        if step % args.eval_every == 0 or step == args.max_steps:
            result = dict(step=step, tokens_seen=step * args.batch_tokens, lr=lr, **evaluate(
                model, val_tokens, args.seq_len, args.batch_size, args.val_tokens, bytes_per_token, device))
            cluster.print0("step {step}/{max_steps} | val loss {val_loss:.4f} | {val_bpb:.3f} bits per byte | "
                           "{tokens_seen:,} tokens seen".format(max_steps=args.max_steps, **result))
            outputs.write({"event": "eval", **result})
            outputs.scalar("val/loss", result["val_loss"], step)
            outputs.scalar("val/bpb", result["val_bpb"], step)
            cluster.TIMES.lap("eval")
        if step % cluster.STOP_CHECK_EVERY == 0 and step < args.max_steps:
            cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, step)
    trained = (step - first_step) * args.batch_tokens  # this run's tokens (a resumed run: since its start)
    seconds = cluster.TIMES.seconds["data"] + cluster.TIMES.seconds["compute"]
    if args.checkpoint_dir and trained:
        checkpoint(epoch, 0)
    cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, 0)

    if result is None:  # nothing left to train (resumed a finished run): still report the model's loss
        cluster.print0(f"nothing to train: the checkpoint has {step} steps (--max-steps={args.max_steps})")
        result = dict(step=step, **evaluate(model, val_tokens, args.seq_len, args.batch_size, args.val_tokens,
                                            bytes_per_token, device))
    # a few texts from the model, each continuing 16 tokens of the val shard
    prompts = [val_tokens[0][16 * n:16 * n + 16].tolist() for n in range(args.samples)]
    texts = sample(model, prompts, 200, args.seq_len, args.seed, device)
    for n, (prompt, text) in enumerate(zip(prompts, texts, strict=True), 1):
        lines = (decode(prompt) + "|" + decode(text)).splitlines()
        cluster.print0(f"sample {n}/{args.samples} (16 tokens of the val shard, '|', then the model's 200):\n" +
                       "\n".join(f"    {line}" for line in lines))
    cluster.TIMES.lap("eval")
    outputs.done(raw_model, "no DataLoader: memory-mapped token shards", **result,
                 tokens_per_s=trained / seconds if trained else None)


# --- main --------------------------------------------------------------------
def main(args):
    with cluster.process_group(args, group="always") as device:  # a group even for one process: fully_shard needs one
        train(args, device)


if __name__ == "__main__":
    main(get_args())
