"""Chat messages as rows give them: checked once, with the row's file:line, for every task.

A message is `{"role", "content"}`; roles are system, user, assistant and tool. Tool use follows the
OpenAI / transformers shape: an assistant message may carry `tool_calls` (a list of
`{"type": "function", "function": {"name", "arguments"}}`; its content may then be empty or null), and a
`tool` message answers one (`tool_call_id`, `name` optional). These keys reach the chat template as they
are; a template that does not render them is refused when a row uses them
(`Tokenizer.apply_chat_template`), rather than dropping the calls silently.
"""

from nemo_aligner.data.rows import DataError

ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")


def check_messages(messages, what: str, where: str, allow_empty_assistant: bool = True) -> list[dict]:
    """The messages normalised ({role, content} plus any tool keys; a null content with tool calls becomes "");
    DataError naming `where` (file:line) and the message otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {what} must be a non-empty list of {{role, content}} messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise DataError(f"{where}: {what}[{k}] must be an object with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {what}[{k}] has unknown role {role!r}; expected one of {list(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{where}: {what}[{k}] has tool_calls but role {role!r}; only assistant messages call tools")
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise DataError(f"{where}: {what}[{k}].tool_calls must be a list of objects "
                                "({type: function, function: {name, arguments}})")
            content = "" if content is None else content
        if not isinstance(content, str):
            raise DataError(f"{where}: {what}[{k}].content must be a string, got {type(content).__name__}")
        if role == "assistant" and not calls and not allow_empty_assistant and not content.strip():
            raise DataError(f"{where}: {what}[{k}] is an empty assistant response")
        message = {"role": role, "content": content}
        message.update({key: m[key] for key in TOOL_KEYS if m.get(key) is not None})
        out.append(message)
    return out


def uses_tools(messages) -> tuple[bool, bool]:
    """(any tool_calls, any tool-role message)."""
    return (any(m.get("tool_calls") for m in messages), any(m.get("role") == "tool" for m in messages))
