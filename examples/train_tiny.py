"""Train the `tiny` OKADFA model on CPU with DFA and with backprop, same code.

    python examples/train_tiny.py [--steps 300] [--batch-size 16] [--seq-len 128]

Data: bytes of the Python standard library's own source files (no download).
Prints the training loss and, for DFA, the alignment between the DFA update and
the true gradient (okadfa.diagnostics.gradient_alignment) per block and for all
blocks together, averaged over 4 fixed probe batches.
"""
import argparse
import glob
import os
import sysconfig
import time

import torch

from okadfa.diagnostics import gradient_alignment
from okadfa.models import OKADFAConfig, OKADFAModel


def stdlib_bytes(limit=2_000_000):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            data += fh.read()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def batches(data, batch_size, seq_len, generator):
    while True:
        i = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        x = torch.stack([data[j:j + seq_len] for j in i])
        y = torch.stack([data[j + 1:j + seq_len + 1] for j in i])
        yield x, y


def train(training, data, args):
    torch.manual_seed(args.seed)
    model = OKADFAModel(OKADFAConfig.preset("tiny", training=training, max_seq_len=args.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    stream = batches(data, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
    probe_stream = batches(data, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed + 1000))
    probes = [next(probe_stream) for _ in range(4)]
    start, recent = time.time(), []
    for step in range(1, args.steps + 1):
        x, y = next(stream)
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if step == 1 or step % args.log_every == 0:
            line = f"{training} step {step:4d} loss {sum(recent) / len(recent):.3f} ({time.time() - start:.0f}s)"
            if training == "dfa":
                reports = [gradient_alignment(model, px, py) for px, py in probes]
                line += "  alignment " + " ".join(
                    f"{k}:{sum(r[k]['cosine'] for r in reports) / len(reports):+.2f}" for k in reports[0])
            print(line, flush=True)
    return sum(recent) / len(recent)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = stdlib_bytes()
    final = {t: train(t, data, args) for t in ("dfa", "bp")}
    print("final loss (mean of the last 20 steps): " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))


if __name__ == "__main__":
    main()
