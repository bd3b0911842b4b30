"""Built-in chat templates and assistant-span extraction.

Owns the jinja chat templates users can name in ``model.data.chat_template``
(``chatml``, ``llama3``, ``qwen2_5``, ``extra_id``, ``plain``), the lookup that
turns a name or a literal jinja string into template text, and
``render_with_assistant_spans``, which finds the characters of each assistant
turn so SFT can train on them only.

Templates receive ``messages`` (list of ``{"role", "content"}``),
``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``raise_exception``;
they are rendered by :meth:`nemo_aligner.data.tokenizer.Tokenizer.apply_chat_template`
with ``trim_blocks``/``lstrip_blocks`` like Hugging Face, so ``{%- ... -%}`` and
plain ``{% ... %}`` both behave as they do in ``transformers``.
"""

from __future__ import annotations

from typing import Any

# ChatML (OpenAI / many fine-tunes):
#   <|im_start|>{role}\n{content}<|im_end|>\n  per message;
#   generation prompt: <|im_start|>assistant\n
# Identical to the ChatML template shipped in Hugging Face tokenizer configs.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3 / 3.1 instruct (without tool calling):
#   <|begin_of_text|> once, then per message
#   <|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>;
#   generation prompt: <|start_header_id|>assistant<|end_header_id|>\n\n
# Meta's template writes bos_token; we write the literal <|begin_of_text|> so the
# format stays Llama 3's whatever tokenizer renders it. Contents are trimmed as
# in Meta's template.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Qwen2.5 instruct (the no-tools path of Qwen's template): ChatML, with the
# default system prompt inserted when the conversation has no system message.
QWEN2_5 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# NeMo / NeMo-Aligner "extra_id" format (Nemotron SFT/DPO data):
#   <extra_id_0>System\n{system}\n                (always; empty system if none)
#   <extra_id_1>User\n{user}\n
#   <extra_id_1>Assistant\n{assistant}\n
# A conversation that ends on an assistant turn is closed with <extra_id_1>, so
# a reply reads "{assistant}\n<extra_id_1>" exactly like NeMo-Aligner's
# chosen_response/rejected_response; the generation prompt is
# <extra_id_1>Assistant\n. Roles are capitalised (system -> System, ...).
EXTRA_ID = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<extra_id_0>System\\n' + messages[0]['content'] + '\\n' }}"
    "{% else %}{{ '<extra_id_0>System\\n\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<extra_id_1>' + message['role'] | capitalize + '\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<extra_id_1>Assistant\\n' }}"
    "{% elif messages and messages[-1]['role'] == 'assistant' %}{{ '<extra_id_1>' }}"
    "{% endif %}"
)

# Plain text for base models: system and user contents followed by "\n",
# assistant contents followed by eos_token; no generation prompt (the model
# simply continues after the last "\n").
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "qwen2_5": QWEN2_5,
    "extra_id": EXTRA_ID,
    "plain": PLAIN,
}


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def get_template(name_or_jinja: str) -> str:
    """Return the jinja text for a built-in template name, or ``name_or_jinja`` itself if it is jinja."""
    if name_or_jinja in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_jinja]
    if _looks_like_jinja(name_or_jinja):
        return name_or_jinja
    raise ValueError(
        f"unknown chat template {name_or_jinja!r}: expected one of "
        f"{sorted(BUILTIN_TEMPLATES)} or a literal jinja template"
    )


def describe_template(template: str | None) -> str:
    """A short human name for a template argument, for error messages."""
    if template is None:
        return "the tokenizer's own chat template"
    if template in BUILTIN_TEMPLATES:
        return f"chat template {template!r}"
    return "the given jinja chat template"


def render_with_assistant_spans(
    tokenizer: Any, messages: list[dict], template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return ``(text, spans)`` with one ``(start, end)`` per assistant message.

    ``text[start:end]`` is the assistant's content plus its end-of-turn marker
    as the template writes it: ``<|im_end|>`` for chatml/qwen2_5, ``<|eot_id|>``
    for llama3, ``eos_token`` for plain, and ``"\\n<extra_id_1>"`` for extra_id
    (NeMo-Aligner's responses end that way). Whitespace the template puts
    *after* the marker (chatml's ``"\\n"``) is left out of the span, since the
    model stops generating at the marker.

    Spans come from rendering prefixes: the assistant turn ``i`` starts where
    ``messages[:i]`` rendered with the generation prompt ends, and ends where
    ``messages[:i + 1]`` rendered without it ends. That requires each of those
    renders to be a prefix of the full conversation; templates that rewrite
    earlier turns (e.g. dropping past reasoning) break this and raise ``ValueError``.
    """

    def render(msgs: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, add_generation_prompt=add_generation_prompt, template=template
        )

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"{describe_template(template)} does not render conversations prefix-consistently "
                f"(rendering messages[:{i}] then message {i} does not reproduce the full "
                "conversation), so assistant spans cannot be located; use a built-in template "
                f"({', '.join(sorted(BUILTIN_TEMPLATES))}) or one without history rewriting"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return text, spans
