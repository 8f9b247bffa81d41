# The smallest comparison that trains for real: the debug reference, 4 steps of 2 x 32 tokens.
TINY_COMPARE = dict(
    reference="debug",
    source="embedded",
    bpe_vocab=300,
    seq_len=32,
    micro_batch_size=2,
    steps=4,
    warmup_steps=1,
    eval_every=2,
    eval_batches=1,
    threads=1,
)
