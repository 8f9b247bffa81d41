"""(6) Data pipeline: BPE training and tokenisation throughput, shard building, loader overhead.

    python -m bench.data_pipeline [--quick]

On tinyshakespeare from ``loopmoe.paths.shared_data_dir()`` (in a temporary folder, so nothing
cached is reused): ``train_bpe_tokenizer`` (vocab 8192), ``encode_batch`` throughput,
``prepare_shards`` end to end, and ``TokenBatchLoader`` time per batch (8 x 256, and 8 x 2048),
compared with one LoopMoE training step on the bench config (how much of a step the loader costs).
Writes bench/results/data_pipeline.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import common
from loopmoe.text import markdown_table


def run(quick: bool = False) -> dict:
    from loopmoe.data.loader import TokenBatchLoader
    from loopmoe.data.shards import prepare_shards
    from loopmoe.data.sources import open_source
    from loopmoe.data.tokenizer import train_bpe_tokenizer
    from loopmoe.paths import shared_data_dir

    common.setup()
    data = shared_data_dir()
    if data is None or not (data / "tinyshakespeare" / "input.txt").is_file():
        raise FileNotFoundError("tinyshakespeare not found: set LOOPMOE_DATA_DIR to the shared data folder")
    text_path = data / "tinyshakespeare" / "input.txt"
    text = text_path.read_text()
    out = {"corpus": str(text_path), "chars": len(text), "bytes": len(text.encode())}
    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(text_path)
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(source, 8192, Path(tmp) / "tok", progress=False)
        out["bpe_train_s"] = time.perf_counter() - t0

        docs = [text[i : i + 4096] for i in range(0, len(text), 4096)]
        enc = common.interleaved({"encode": lambda: tok.encode_batch(docs)}, reps=3, tries=8, budget_s=10)["encode"]
        n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
        out.update(
            tokens=n_tokens,
            encode=enc,
            encode_mb_s=out["bytes"] / enc["median"] / 1e6,
            encode_tok_s=n_tokens / enc["median"],
            chars_per_token=len(text) / n_tokens,
        )

        t0 = time.perf_counter()
        shards = prepare_shards(source, tok, Path(tmp) / "shards", progress=False)
        out["prepare_shards_s"] = time.perf_counter() - t0
        out["prepare_shards_tok_s"] = n_tokens / out["prepare_shards_s"]
        tokens = shards.tokens("train")

        loader_rows = []
        for batch, seq in ((8, 256), (8, 2048)):
            loader = TokenBatchLoader(tokens, batch_size=batch, seq_len=seq, seed=0)
            n = 200 if quick else 1000
            t0 = time.perf_counter()
            for _ in range(n):
                next(loader)
            per = (time.perf_counter() - t0) / n
            loader_rows.append(
                {"batch": batch, "seq": seq, "us_per_batch": per * 1e6, "tokens_per_s": batch * seq / per}
            )
        out["loader"] = loader_rows
    train = common.RESULTS / "train_step.json"
    if train.is_file():
        import json

        step = next(
            r for r in json.loads(train.read_text())["rows"] if r["model"] == "ours" and r["step"] == "fwd+bwd+AdamW"
        )
        out["loader_share_of_step"] = loader_rows[0]["us_per_batch"] * 1e-6 / step["time"]["median"]
    return out


def main(argv=None) -> dict:
    r = run(common.quick_flag(__doc__, argv))
    rows = [
        ["train BPE (vocab 8192)", f"{r['bpe_train_s']:.2f} s", f"{r['bytes'] / r['bpe_train_s'] / 1e6:.2f} MB/s"],
        [
            "encode_batch (4 KiB docs)",
            f"{r['encode']['median'] * 1e3:.0f} ms",
            f"{r['encode_mb_s']:.2f} MB/s, {r['encode_tok_s'] / 1e6:.2f} M tok/s",
        ],
        [
            "prepare_shards (end to end)",
            f"{r['prepare_shards_s']:.2f} s",
            f"{r['prepare_shards_tok_s'] / 1e6:.2f} M tok/s",
        ],
    ]
    rows += [
        [
            f"TokenBatchLoader {l['batch']}x{l['seq']}",
            f"{l['us_per_batch']:.0f} us/batch",
            f"{l['tokens_per_s'] / 1e6:.1f} M tok/s",
        ]
        for l in r["loader"]
    ]
    print(markdown_table(["stage", "time", "throughput"], rows))
    print(f"tinyshakespeare: {r['bytes'] / 1e6:.2f} MB, {r['tokens']} tokens ({r['chars_per_token']:.2f} chars/token)")
    if "loader_share_of_step" in r:
        print(f"loader share of one LoopMoE training step (8x256): {100 * r['loader_share_of_step']:.3f}%")
    common.write_json("data_pipeline", r)
    return r


if __name__ == "__main__":
    main()
