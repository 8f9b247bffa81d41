"""The smallest real training run: a tiny LoopMoE on the embedded corpus with a 300-token BPE, two steps.

Run-config overrides (``key=value``) for ``load_run_config``; the tests' trained-checkpoint fixtures and
``bench.adaptive_depth --smoke`` train with them (seconds on a CPU core).
"""

TINY_RUN = [
    "data.source=embedded",
    "data.train_bpe_vocab=300",
    "data.seq_len=32",
    "train.max_steps=2",
    "schedule.warmup_steps=0",
    "train.eval_batches=0",
    "train.micro_batch_size=2",
    "model.hidden_size=32",
    "model.num_core_layers=1",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=16",
    "model.num_experts=4",
    "model.moe_intermediate_size=16",
]
