"""Train the `tiny` OKADFA model on CPU with DFA and with backprop, same code.

    python examples/train_tiny.py [--steps 300] [--batch-size 16] [--seq-len 128]

Data: bytes of the Python standard library's own source files (okadfa.training.data's
"stdlib" corpus, no download). Prints the training loss and, for DFA, the
alignment between the DFA update and the true gradient of the weights that write
the residual stream (okadfa.diagnostics.mean_alignment, "writers") per block and
for all blocks together, averaged over 4 fixed validation batches.
"""
import argparse
import time

import torch

from okadfa.training.data import get_batch, load_corpus, val_batches
from okadfa.diagnostics import mean_alignment
from okadfa.models import OKADFAConfig, OKADFAModel


def train(training, corpus, args):
    torch.manual_seed(args.seed)
    # the same (post-LN) architecture for both rules, so they compare like for like
    model = OKADFAModel(OKADFAConfig.preset("tiny", training=training, norm="post", max_seq_len=args.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    probes = list(val_batches(corpus.val, args.batch_size, args.seq_len, 4))
    start, recent = time.time(), []
    for step in range(1, args.steps + 1):
        x, y = get_batch(corpus.train, step, args.batch_size, args.seq_len, seed=args.seed)
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if step == 1 or step % args.log_every == 0:
            line = f"{training} step {step:4d} loss {sum(recent) / len(recent):.3f} ({time.time() - start:.0f}s)"
            if training == "dfa":
                writers = mean_alignment(model, probes)["writers"]
                line += "  writer alignment " + " ".join(f"{k}:{c:+.2f}" for k, c in writers.items())
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
    corpus = load_corpus("stdlib")
    final = {t: train(t, corpus, args) for t in ("dfa", "bp")}
    print("final loss (mean of the last 20 steps): " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))


if __name__ == "__main__":
    main()
