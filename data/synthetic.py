"""A small synthetic corpus for runs on machines without data (the smoke preset): documents of
made-up words with a Zipf-like frequency and a little grammar, so a model has something to learn
and a BPE tokenizer has pairs to merge. Deterministic for a given seed."""
import glob
import os
import random

from data.prepare import prepare, train_tokenizer

SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["the", "and", "ing", "tion", "er"]


def synthetic_documents(num_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(3000)})
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words are common
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            sentence = rng.choices(words, weights, k=rng.randint(4, 14))
            sentences.append(" ".join(sentence).capitalize() + rng.choice([".", ".", ".", "!", "?"]))
        if rng.random() < 0.3:
            sentences.append(f"In {rng.randint(1900, 2030)} there were {rng.randint(2, 999)} of them.")
        docs.append(" ".join(sentences))
    return docs


def make_smoke_dataset(folder: str, vocab_size: int, seed: int = 0, num_docs: int = 3000, val_docs: int = 200) -> None:
    """Tokenizer (folder/tokenizer.model) and shards (folder/fineweb_{train,val}_*.bin); a folder
    that already holds them (a resumed run) is kept: the corpus is a function of the seed."""
    tokenizer = os.path.join(folder, "tokenizer.model")
    shards = [glob.glob(os.path.join(folder, f"fineweb_{split}_*.bin")) for split in ("train", "val")]
    if os.path.isfile(tokenizer) and all(shards):
        return
    os.makedirs(folder, exist_ok=True)
    docs = synthetic_documents(num_docs, seed)
    train_tokenizer(docs, tokenizer, vocab_size)
    prepare(docs, folder, tokenizer, val_docs=val_docs, shard_tokens=1_000_000, overwrite=True)
