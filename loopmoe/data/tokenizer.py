"""Load or train the tokenizer, and know which token separates documents.

Everything downstream (shards, the exported HF model folder) needs two facts from
a tokenizer: how to turn text into ids fast, and the end-of-text id used as the
document separator. ``LMTokenizer`` holds exactly that, over a ``tokenizers``
backend with any saved truncation/padding switched off (the GPT-2 tokenizer.json
in the shared data has ``max_length=50`` saved, which would silently cut every
document).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from loopmoe.atomic import atomic_directory
from loopmoe.console import interactive, status
from loopmoe.data.sources import DataSource
from loopmoe.errors import ConfigError, DataError, MissingFileError
from loopmoe.trust import no_remote_code

log = logging.getLogger(__name__)

DEFAULT_EOS_TOKEN = "<|endoftext|>"
# Looked up in this order when neither the caller nor a tokenizer_config.json names the EOS token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
_TRAINING_STAMP = "loopmoe_tokenizer_training.json"


@dataclass(frozen=True)
class LMTokenizer:
    """A ``tokenizers.Tokenizer`` plus its end-of-text token (the document separator)."""

    backend: Tokenizer
    eos_token: str
    eos_id: int

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without special tokens (EOS is added by the shard writer)."""
        return [enc.ids for enc in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def content_hash(self) -> str:
        """sha256 of the serialised tokenizer: changes iff tokenisation may change."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def to_transformers(self):
        """A ``PreTrainedTokenizerFast`` over a copy of the backend; EOS is also its BOS, UNK and pad token.

        Padding with EOS is the causal-LM convention (GPT-2, Llama): padded positions are masked out
        of attention and labels, so which id fills them never matters, and batched ``generate`` /
        ``pipeline`` and HF ``Trainer`` need a pad token to exist.
        """
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(self.backend.to_str()),
            eos_token=self.eos_token,
            bos_token=self.eos_token,
            unk_token=self.eos_token,
            pad_token=self.eos_token,
        )

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and the config files ``AutoTokenizer.from_pretrained`` reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_transformers().save_pretrained(str(directory))
        return directory


# The chat template of the tokenizers loopmoe writes, for base models: a plain-text transcript, one
# "Role: text" line per message, and "Assistant:" to continue when a reply is asked for. A base model
# was never tuned to chat; this makes `/v1/chat/completions`, `transformers chat` and
# `apply_chat_template` work with it as a text continuation. A tokenizer a user brings keeps its own.
BASE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def export_tokenizer(tokenizer, model_max_length: int):
    """The tokenizer a model folder ships with: transformers' (from an ``LMTokenizer``, or a transformers
    tokenizer as it is), with a pad token (its EOS when it has none, as ``to_transformers`` does),
    ``model_max_length`` the context the model was trained on (instead of transformers' 1e30 placeholder)
    and a chat template (``BASE_CHAT_TEMPLATE`` when it has none)."""
    hf = tokenizer.to_transformers() if isinstance(tokenizer, LMTokenizer) else tokenizer
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token
    if not getattr(hf, "chat_template", None):
        hf.chat_template = BASE_CHAT_TEMPLATE
    hf.model_max_length = model_max_length
    return hf


def special_token_ids(hf_tokenizer) -> dict[str, int | None]:
    """``bos/eos/pad_token_id`` of a transformers tokenizer: what a model's config and generation config
    must carry so that ``generate`` stops at EOS and pads batches."""
    return {name: getattr(hf_tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}


def load_tokenizer(path: str | Path, *, eos_token: str | None = None) -> LMTokenizer:
    """Load a ``tokenizer.json`` file, or an HF tokenizer folder (offline).

    The EOS token is ``eos_token`` if given, else the folder's configured
    ``eos_token``, else the first of ``EOS_CANDIDATES`` in the vocabulary.
    """
    path = Path(path).expanduser()
    if path.is_file():
        backend = Tokenizer.from_file(str(path))
        configured = None
    elif path.is_dir():
        backend, configured = _load_folder(path)
    else:
        raise MissingFileError(
            f"tokenizer {str(path)!r} does not exist: pass a tokenizer.json file, an HF tokenizer "
            "folder, or train one with train_bpe_tokenizer()"
        )
    backend.no_truncation()
    backend.no_padding()
    return _with_eos(backend, eos_token or configured, where=str(path))


def train_bpe_tokenizer(
    source: DataSource,
    vocab_size: int,
    directory: str | Path,
    *,
    eos_token: str = DEFAULT_EOS_TOKEN,
    min_frequency: int = 2,
    max_chars: int | None = None,
    progress: bool = True,
) -> LMTokenizer:
    """Train a byte-level BPE on ``source`` and save it to ``directory``; reuse it if done before.

    Reuse is keyed on the source identity and the training options, stored beside
    the tokenizer, so rerunning a job does not retrain. ``max_chars`` caps the
    training text (BPE statistics settle long before a large corpus is exhausted).
    The folder is written atomically and loads with ``AutoTokenizer.from_pretrained``.
    """
    if vocab_size < 257:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: use at least 257 (256 bytes + EOS)"
        )
    directory = Path(directory)
    if tokenizer_is_current(
        source, vocab_size, directory, eos_token=eos_token, min_frequency=min_frequency, max_chars=max_chars
    ):
        log.info("reusing the BPE tokenizer in %s (trained on the same source and options)", directory)
        return load_tokenizer(directory)
    stamp = _training_stamp(source, vocab_size, eos_token, min_frequency, max_chars)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress and interactive(),  # the Rust bar redraws per chunk: a terminal's, not a log's
    )
    log.info("training a %d-token byte-level BPE on %s", vocab_size, source.spec)
    t0 = time.perf_counter()
    backend.train_from_iterator(_capped(source.documents(), max_chars), trainer=trainer)
    if progress and not interactive():
        status(f"trained a {vocab_size}-token BPE on {source.spec} in {time.perf_counter() - t0:.1f} s")
    tokenizer = _with_eos(backend, eos_token, where=source.spec)
    with atomic_directory(directory, legacy_marker=_TRAINING_STAMP) as staging:  # caches before the marker
        tokenizer.save(staging)
        (staging / _TRAINING_STAMP).write_text(json.dumps(stamp, indent=2))
    return tokenizer


def _training_stamp(
    source: DataSource, vocab_size: int, eos_token: str, min_frequency: int, max_chars: int | None
) -> dict[str, object]:
    return {
        "source": source.spec,
        "source_identity": source.identity(),
        "vocab_size": vocab_size,
        "eos_token": eos_token,
        "min_frequency": min_frequency,
        "max_chars": max_chars,
    }


def tokenizer_is_current(
    source: DataSource,
    vocab_size: int,
    directory: str | Path,
    *,
    eos_token: str = DEFAULT_EOS_TOKEN,
    min_frequency: int = 2,
    max_chars: int | None = None,
) -> bool:
    """Whether ``train_bpe_tokenizer`` with these arguments would reuse ``directory`` (reads only)."""
    stamp_path = Path(directory) / _TRAINING_STAMP
    try:
        saved = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict):
        return False
    # Content-based: the corpus's path ("source", recorded for people to read) is not compared, its bytes'
    # hash ("source_identity") is; stamps of older loopmoe hold the same keys and are read the same way.
    current = _training_stamp(source, vocab_size, eos_token, min_frequency, max_chars)
    return {k: v for k, v in saved.items() if k != "source"} == {k: v for k, v in current.items() if k != "source"}


def _load_folder(path: Path) -> tuple[Tokenizer, str | None]:
    from transformers import AutoTokenizer

    try:
        with no_remote_code(path / "tokenizer_config.json"):
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise DataError(
            f"{str(path)!r} is not a loadable HF tokenizer folder ({error}); pass its tokenizer.json instead"
        ) from error
    if not getattr(hf, "is_fast", False):
        raise DataError(f"{str(path)!r} holds a slow tokenizer only; add a tokenizer.json to the folder")
    return Tokenizer.from_str(hf.backend_tokenizer.to_str()), hf.eos_token


def _with_eos(backend: Tokenizer, eos_token: str | None, *, where: str) -> LMTokenizer:
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return LMTokenizer(backend, name, token_id)
    raise DataError(
        f"tokenizer {where!r} has no end-of-text token (looked for {names}); pass eos_token= with one of its tokens"
    )


def _capped(documents: Iterable[str], max_chars: int | None) -> Iterator[str]:
    if max_chars is None:
        yield from documents
        return
    total = 0
    for doc in documents:
        if total >= max_chars:
            return
        doc = doc[: max_chars - total]
        total += len(doc)
        yield doc
