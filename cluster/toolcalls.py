"""Tool calls for the OpenAI chat API, in one generic format whatever the model's chat template (Hermes
style, as Qwen's templates write it): the tools are listed in the system message, a call is the answer

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and a tool's result comes back as a user turn inside <tool_response> tags. The call is a structured
output: a Lark grammar (llguidance) holds the name to one of the tools and the arguments to that tool's
JSON schema, so a call always parses. tool_choice: "required" or a named tool answers with a call; "auto"
with a call or text (text that does not start with '<'); "none" with text, the tools still listed."""
from __future__ import annotations

import json
import re

from drafthorse.actors.spec.grammar import JSON_LAYOUT

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128


class ToolError(ValueError):
    """A tools / tool_choice the request got wrong (HTTP 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check(tools: list[dict], choice: str | None) -> None:
    """tools: [{"name", "description", "parameters"}]; choice: none | auto | required | a tool's name."""
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    names = [t["name"] for t in tools]
    for i, t in enumerate(tools):
        if not NAME.fullmatch(t["name"]):
            raise ToolError(f"tools[{i}].function.name", "a tool name is 1-64 letters, digits, '_' or '-', got "
                            f"{t['name']!r}")
        if t["parameters"] is not None and not isinstance(t["parameters"], dict):
            raise ToolError(f"tools[{i}].function.parameters", "parameters must be a JSON Schema object")
    if len(set(names)) != len(names):
        raise ToolError("tools", "tool names must be unique")
    if choice not in (None, "none", "auto", "required") and choice not in names:
        raise ToolError("tool_choice", f"tool_choice names {choice!r}, which is not among the tools")


def system_text(tools: list[dict]) -> str:
    """What the system message says about the tools."""
    lines = [json.dumps({k: v for k, v in t.items() if v is not None}) for t in tools]
    return ("You can call these tools. To call one, answer with nothing but\n" + OPEN +
            '{"name": <the tool\'s name>, "arguments": <its arguments as JSON>}' + CLOSE +
            "\nand wait for its result.\nTools:\n" + "\n".join(lines))


def call_text(name: str, arguments: str) -> str:
    """An earlier call of the conversation (arguments: JSON text), as the model would have written it."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = arguments
    return OPEN + json.dumps({"name": name, "arguments": args}) + CLOSE


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def grammar(tools: list[dict], choice: str) -> str | None:
    """A Lark grammar for the answer (None: free text)."""
    if choice == "none":
        return None
    called = [t for t in tools if choice in ("auto", "required") or t["name"] == choice]
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                          "arguments": t["parameters"] or {"type": "object"}},
                         "required": ["name", "arguments"], "additionalProperties": False} for t in called],
              "x-guidance": JSON_LAYOUT}
    rules = [f"call_block: {json.dumps(OPEN)} call {json.dumps(CLOSE)}", f"call: %json {json.dumps(schema)}"]
    if choice == "auto":
        return "\n".join(["start: call_block | TEXT", r"TEXT: /[^<][\s\S]*/", *rules])
    return "\n".join(["start: call_block", *rules])


def parse(text: str) -> dict | None:
    """{"name", "arguments" (JSON text)} of the call `text` is, or None when it is not one (text, or a call
    cut short by max_tokens)."""
    if not (text.startswith(OPEN.strip()) and text.rstrip().endswith(CLOSE.strip())):
        return None
    try:
        call = json.loads(text.strip()[len(OPEN.strip()):-len(CLOSE.strip())])
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}
