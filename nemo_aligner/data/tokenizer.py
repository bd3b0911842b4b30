"""One tokenizer interface over Hugging Face ``tokenizer.json`` folders and sentencepiece models.

``Tokenizer.from_path`` accepts what NeMo users pass as ``+tokenizer_path`` /
``+tokenizer_type`` (``huggingface`` or ``sentencepiece``) and what Hugging Face
users have on disk. It never runs remote code: Hugging Face folders are read
with the ``tokenizers`` library plus our own reading of ``tokenizer_config.json``
/ ``special_tokens_map.json``, and chat templates are rendered by our own
sandboxed jinja environment so sentencepiece tokenizers get templates too.

Choices:
- A tokenizer without a pad token pads with eos (``pad_id_is_eos``), with one
  logged warning; padding positions are masked out of every loss, so the id only
  has to be valid.
- ``encode(add_special_tokens=False)`` returns exactly the tokens of the text.
  With ``True``, explicit ``add_bos_token``/``add_eos_token`` flags in the config
  (llama style) decide; otherwise the ``tokenizer.json`` post-processor does, as in
  ``transformers``. Sentencepiece defaults to bos only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nemo_aligner.data.chat_templates import BUILTIN_TEMPLATES, describe_template, get_template
from nemo_aligner.data.messages import uses_tools

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("auto", "huggingface", "sentencepiece")
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
SP_FILE = "tokenizer.model"
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token")


# ----------------------------------------------------------------------------- file discovery


def _resolve(path: Path, tokenizer_type: str) -> tuple[str, Path]:
    """Return ``(kind, file)`` for a tokenizer path; ``kind`` is huggingface or sentencepiece."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer_type={tokenizer_type!r}: expected one of {TOKENIZER_TYPES}")
    if not path.exists():
        raise ValueError(f"tokenizer path {path} does not exist")
    if path.is_file():
        kind = "huggingface" if path.name == HF_FILE else "sentencepiece" if path.suffix == ".model" else None
        if kind is None:
            raise ValueError(f"tokenizer file {path}: expected a {HF_FILE} or a sentencepiece *.model file")
        if tokenizer_type not in ("auto", kind):
            raise ValueError(f"tokenizer_type={tokenizer_type!r} but {path} is a {kind} tokenizer file")
        return kind, path
    has_hf = (path / HF_FILE).is_file()
    if tokenizer_type == "huggingface" or (tokenizer_type == "auto" and has_hf):
        if not has_hf:
            raise ValueError(f"tokenizer_type='huggingface' but there is no {HF_FILE} in {path}")
        return "huggingface", path / HF_FILE
    return "sentencepiece", _find_sp_model(path, tokenizer_type)


def _find_sp_model(folder: Path, tokenizer_type: str) -> Path:
    if (folder / SP_FILE).is_file():
        return folder / SP_FILE
    models = sorted(p for p in folder.glob("*.model") if p.is_file())
    if len(models) == 1:
        return models[0]
    if not models:
        if tokenizer_type == "sentencepiece":
            raise ValueError(f"tokenizer_type='sentencepiece' but there is no *.model file in {folder}")
        raise ValueError(
            f"no {HF_FILE} or *.model in {folder}: expected a Hugging Face or sentencepiece tokenizer"
        )
    names = [p.name for p in models]
    raise ValueError(
        f"several sentencepiece models in {folder} ({names}): expected exactly one or a {SP_FILE}"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens are stored as strings or as AddedToken dicts with ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any, source: Path) -> str | None:
    """``chat_template`` may be a string or a list of ``{name, template}``; lists give ``default``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    raise ValueError(f"chat_template in {source}: expected a string or a list of {{name, template}}")


def _read_folder_config(folder: Path) -> tuple[dict, str | None]:
    """Merged tokenizer config (special_tokens_map.json under tokenizer_config.json) and chat template."""
    config = _read_json(folder / SPECIAL_TOKENS_FILE)
    config.update(_read_json(folder / CONFIG_FILE))
    template_file = folder / TEMPLATE_FILE
    if template_file.is_file():  # transformers >= 4.43 saves the template here and prefers it
        return config, template_file.read_text(encoding="utf-8")
    return config, _pick_chat_template(config.get("chat_template"), folder / CONFIG_FILE)


# ----------------------------------------------------------------------------- backends


class _HFBackend:
    """``tokenizers.Tokenizer`` from a tokenizer.json; bytes kept for fingerprint and save."""

    kind = "huggingface"

    def __init__(self, file: Path):
        import tokenizers

        self.raw = file.read_bytes()
        try:
            self.tok = tokenizers.Tokenizer.from_str(self.raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"could not load Hugging Face tokenizer {file}: {e}") from e

    def encode(self, text: str, post_process: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=post_process).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def defining_bytes(self) -> bytes:
        # Canonical JSON so a re-indented or key-reordered copy hashes the same.
        parsed = json.loads(self.raw)
        return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def default_special(self) -> dict[str, int | None]:
        return {"bos_token": None, "eos_token": None, "pad_token": None}


class _SPBackend:
    """``sentencepiece.SentencePieceProcessor`` from a .model; bytes kept for fingerprint and save."""

    kind = "sentencepiece"

    def __init__(self, file: Path):
        import sentencepiece

        self.raw = file.read_bytes()
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.raw)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise ValueError(f"could not load sentencepiece model {file}: {e}") from e

    def encode(self, text: str, post_process: bool) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode(ids)
        # sentencepiece drops control tokens (bos/eos/pad) when decoding; keep them as text.
        pieces, run = [], []
        for token_id in ids:
            if self.sp.is_control(token_id):
                pieces += [self.sp.decode(run), self.sp.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(pieces + [self.sp.decode(run)])

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id):
            return None  # piece_to_id maps unknown pieces to unk
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def defining_bytes(self) -> bytes:
        return self.raw

    def default_special(self) -> dict[str, int | None]:
        ids = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(), "pad_token": self.sp.pad_id()}
        return {role: (i if i >= 0 else None) for role, i in ids.items()}


# ----------------------------------------------------------------------------- jinja rendering


class _GenerationTag(Extension):
    """Accept transformers' ``{% generation %}...{% endgeneration %}`` and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson`` filter: keeps non-ASCII text as is, unlike jinja's built-in."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ----------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """A Hugging Face or sentencepiece tokenizer with its special tokens and chat template."""

    def __init__(
        self, backend: _HFBackend | _SPBackend, config: dict, chat_template: str | None, name_or_path: str
    ):
        self._backend = backend
        self._config = config
        self._chat_template = chat_template
        self.name_or_path = name_or_path
        self._special = self._resolve_special_tokens()
        # Explicit llama-style flags, or sentencepiece (no post-processor): we add bos/eos ourselves.
        self._manual_special = backend.kind == "sentencepiece" or any(
            config.get(k) is not None for k in ("add_bos_token", "add_eos_token")
        )
        self._add_bos = self._special_flag("add_bos_token", "bos_token", 0)
        self._add_eos = self._special_flag("add_eos_token", "eos_token", -1)
        if self._special["pad_token"] is None:
            if self._special["eos_token"] is None:
                raise ValueError(
                    f"tokenizer {name_or_path} has neither a pad nor an eos token: "
                    f"expected pad_token or eos_token in its {CONFIG_FILE}"
                )
            logger.warning(
                "tokenizer %s has no pad token; padding with eos (id %d)", name_or_path, self.eos_id
            )

    @classmethod
    def from_path(cls, path: str | Path, tokenizer_type: str = "auto") -> "Tokenizer":
        """Load a Hugging Face folder / tokenizer.json, or a sentencepiece .model (file or folder)."""
        path = Path(path)
        kind, file = _resolve(path, tokenizer_type)
        backend = _HFBackend(file) if kind == "huggingface" else _SPBackend(file)
        # Config (special tokens, flags, template) lives beside tokenizer.json; a bare .model has none.
        folder = path if path.is_dir() else path.parent if kind == "huggingface" else None
        config, template = _read_folder_config(folder) if folder is not None else ({}, None)
        return cls(backend, config, template, str(path))

    def _resolve_special_tokens(self) -> dict[str, int | None]:
        """Config tokens override the model's own (sentencepiece) ids; unknown tokens are an error."""
        special = self._backend.default_special()
        for role in SPECIAL_ROLES:
            token = _token_content(self._config.get(role))
            if token is None:
                continue
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"{role} {token!r} in the config of tokenizer {self.name_or_path} "
                    "is not in its vocabulary: expected an existing token"
                )
            special[role] = token_id
        return special

    def _special_flag(self, flag: str, role: str, position: int) -> bool:
        """A config flag wins; otherwise sentencepiece adds bos only and HF follows its post-processor."""
        if self._config.get(flag) is not None:
            return bool(self._config[flag])
        if self._backend.kind == "sentencepiece":
            return role == "bos_token"
        probe = self._backend.encode("", post_process=True)
        return self._special[role] is not None and probe[position:][:1] == [self._special[role]]

    # -- special tokens

    @property
    def bos_id(self) -> int | None:
        return self._special["bos_token"]

    @property
    def eos_id(self) -> int | None:
        return self._special["eos_token"]

    @property
    def pad_id(self) -> int:
        pad = self._special["pad_token"]
        return self.eos_id if pad is None else pad

    @property
    def pad_id_is_eos(self) -> bool:
        return self._special["pad_token"] is None or self._special["pad_token"] == self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._backend.id_to_token(self.eos_id)

    # -- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` also bos/eos as the tokenizer is configured."""
        if add_special_tokens and not self._manual_special:
            return self._backend.encode(text, post_process=True)
        ids = self._backend.encode(text, post_process=False)
        if not add_special_tokens:
            return ids
        bos = [self.bos_id] if self._add_bos and self.bos_id is not None else []
        eos = [self.eos_id] if self._add_eos and self.eos_id is not None else []
        return bos + ids + eos

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    # -- chat templates

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self._chat_template = None if value is None else get_template(value)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, template: str | None = None
    ) -> str:
        """Render ``messages`` with ``template``: None (the tokenizer's own), a built-in name, or jinja. Messages
        with ``tool_calls`` or the ``tool`` role need a template that renders them (it names them)."""
        text = self._template_text(template)
        calls, tool_role = uses_tools(messages)
        if (calls and "tool_calls" not in text) or (tool_role and "tool" not in text):
            raise ValueError(f"{describe_template(template)} does not render "
                             f"{'tool calls (tool_calls)' if calls and 'tool_calls' not in text else 'the tool role'}; "
                             "use the model's own chat template (one written for tool use) or drop those messages")
        try:
            return _compile(text).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except (jinja2.exceptions.TemplateError, TypeError) as e:  # TypeError: e.g. content None + str
            raise ValueError(f"{describe_template(template)} failed to render: {e}") from e

    def _template_text(self, template: str | None) -> str:
        if template is not None:
            return get_template(template)
        if self._chat_template is None:
            raise ValueError(
                f"tokenizer {self.name_or_path} has no chat template: set model.data.chat_template "
                f"to one of the built-in names {sorted(BUILTIN_TEMPLATES)} or to a jinja template"
            )
        return self._chat_template

    # -- identity and persistence

    def fingerprint(self) -> str:
        """sha256 of what decides the ids: vocabulary/model content, special ids and bos/eos flags."""
        h = hashlib.sha256()
        h.update(self._backend.kind.encode())
        h.update(self._backend.defining_bytes())
        ids = {"special": self._special, "add_bos": self._add_bos, "add_eos": self._add_eos}
        h.update(json.dumps(ids, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write a folder that ``from_path`` loads back to an identical tokenizer."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        model_file = HF_FILE if self._backend.kind == "huggingface" else SP_FILE
        (folder / model_file).write_bytes(self._backend.raw)
        config_text = json.dumps(self._saved_config(), indent=2, ensure_ascii=False) + "\n"
        (folder / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        (folder / TEMPLATE_FILE).unlink(missing_ok=True)  # it would shadow the config's template
        if self._backend.kind == "sentencepiece":
            (folder / HF_FILE).unlink(missing_ok=True)  # it would win over tokenizer.model on load

    def _saved_config(self) -> dict:
        config = {k: v for k, v in self._config.items() if k not in SPECIAL_ROLES + ("chat_template",)}
        for role in SPECIAL_ROLES:  # a missing pad stays missing, so pad_id_is_eos survives the round trip
            if self._special[role] is not None:
                config[role] = self._backend.id_to_token(self._special[role])
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        if self._backend.kind == "sentencepiece":
            config.update(add_bos_token=self._add_bos, add_eos_token=self._add_eos)
        else:
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        return config

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, kind={self._backend.kind}, vocab_size={self.vocab_size})"
