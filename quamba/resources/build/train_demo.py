"""Train a small Mamba1 or Mamba2 LM on the shipped corpus, so quantization has something to hurt.

Deterministic for a given seed and thread count. Writes our normalized FP16 model dir plus
train.json (loss curve, held-out perplexity) beside it.

    python resources/build/train_demo.py --layer Mamba1 --out resources/models/mamba1-demo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

from quamba.io import write_json
from quamba.models import MambaConfig, MambaLMHeadModel
from quamba.models.checkpoint import save_fp16

RESOURCES = Path(__file__).resolve().parents[1]
ARCHITECTURES = {
    "Mamba1": dict(d_model=128, n_layer=6, d_state=16),
    "Mamba2": dict(d_model=128, n_layer=6, d_state=32, headdim=32, ngroups=1, chunk_size=64),
}


def token_stream(path: Path, tokenizer) -> torch.Tensor:
    """All documents of a split as one token stream, each followed by end-of-text."""
    docs = [d for d in path.read_text().split("\n\n") if d.strip()]
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: MambaLMHeadModel, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the stream."""
    model.eval()
    n = (stream.numel() - 1) // seq_len
    windows = stream[: n * seq_len + 1]
    inputs = windows[:-1].view(n, seq_len)  # (n, l)
    targets = windows[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(inputs[i:i + batch_size]).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch_size].flatten(), reduction="sum").item()
    model.train()
    return math.exp(total / (n * seq_len))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer_dir = RESOURCES / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = token_stream(RESOURCES / "corpus" / "train.txt", tokenizer)
    valid = token_stream(RESOURCES / "corpus" / "valid.txt", tokenizer)

    config = MambaConfig(layer=args.layer, vocab_size=len(tokenizer), **ARCHITECTURES[args.layer])
    model = MambaLMHeadModel(config)
    model.reset_parameters(args.seed)
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.endswith(("A_log", "D"))]
    decay = [p for n, p in model.named_parameters() if not (p.dim() < 2 or n.endswith(("A_log", "D")))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    losses: list[tuple[int, float]] = []
    start = time.time()
    model.train()
    for step in (bar := tqdm(range(args.steps), desc=f"train {args.layer}")):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup=100)
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_size,), generator=generator)
        batch = train[starts[:, None] + offsets]  # (b, l + 1)
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            losses.append((step, round(loss.item(), 4)))
            bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    fp16 = model.half().float()  # measure what is shipped: fp16 weights
    valid_ppl = perplexity(fp16, valid, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    save_fp16(model, args.out, tokenizer_dir,
              source={"source": "resources/build/train_demo.py", "format": "trained"})
    report = {
        "layer": args.layer, "parameters": n_params, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "threads": args.threads,
        "train_tokens": train.numel(), "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "final_train_loss": losses[-1][1], "valid_perplexity": round(valid_ppl, 3),
        "uniform_perplexity": len(tokenizer), "loss_curve": losses,
        "train_seconds": round(time.time() - start, 1),
    }
    write_json(args.out.parent / f"{args.out.name}.train.json", report)
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=2))


if __name__ == "__main__":
    main()
