"""Padded batches for the Hugging Face tests: three token lists of unequal lengths, padded with
token 0, and a few Trainer steps on them."""
import torch

SEQS = [list(range(3, 15)), list(range(20, 27)), list(range(40, 44))]     # lengths 12, 7, 4


def padded(seqs, side):
    """(input_ids, attention_mask) of a batch of token lists, padded with token 0 on `side`."""
    n = max(len(x) for x in seqs)
    ids, mask = torch.zeros(len(seqs), n, dtype=torch.long), torch.zeros(len(seqs), n, dtype=torch.long)
    for b, x in enumerate(seqs):
        cols = slice(0, len(x)) if side == "right" else slice(n - len(x), n)
        ids[b, cols], mask[b, cols] = torch.tensor(x), 1
    return ids, mask


def collate(features):
    """Right-pads a list of {"input_ids": [...]} with token 0; labels -100 at the padding."""
    ids, mask = padded([f["input_ids"] for f in features], "right")
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def trainer_losses(model, output_dir, steps=12):
    """transformers.Trainer on SEQS (padded by `collate`, 3 per batch) for `steps` steps on the CPU:
    (the logged training losses, the trainer)."""
    import transformers
    args = transformers.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=3, max_steps=steps,
                                          learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": x} for x in SEQS] * 8,
                                   data_collator=collate)
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], trainer
