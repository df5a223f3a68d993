"""Record formats: detection from the keys, validation, and typed samples.

A record becomes one of four sample types; everything after this module works on those
types and never on raw dicts. Validation names the record's location and the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

from jaxtune.data.records import BadRecord, Location

# The fields a record must have, per format (and the order in which auto-detection tries them).
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclasses.dataclass(frozen=True)
class TextSample:
    location: Location
    text: str


@dataclasses.dataclass(frozen=True)
class PromptCompletionSample:
    location: Location
    prompt: str
    completion: str


@dataclasses.dataclass(frozen=True)
class AlpacaSample:
    location: Location
    instruction: str
    input: str
    output: str
    system: str


@dataclasses.dataclass(frozen=True)
class ChatSample:
    location: Location
    messages: tuple[Message, ...]
    source_format: str  # sharegpt | messages


Sample = Union[TextSample, PromptCompletionSample, AlpacaSample, ChatSample]


@dataclasses.dataclass(frozen=True)
class Field:
    """One piece of text of a sample, for data-quality checks."""

    name: str  # e.g. "completion", "messages[3].content"
    text: str
    trained: bool  # the model learns to produce it (when train_on_prompt is off)
    optional: bool = False  # may be empty (alpaca input, system)


def sample_fields(sample: Sample) -> list[Field]:
    if isinstance(sample, TextSample):
        return [Field("text", sample.text, True)]
    if isinstance(sample, PromptCompletionSample):
        return [Field("prompt", sample.prompt, False), Field("completion", sample.completion, True)]
    if isinstance(sample, AlpacaSample):
        return [
            Field("system", sample.system, False, optional=True),
            Field("instruction", sample.instruction, False),
            Field("input", sample.input, False, optional=True),
            Field("output", sample.output, True),
        ]
    key, content = ("conversations", "value") if sample.source_format == "sharegpt" else ("messages", "content")
    return [
        Field(f"{key}[{i}].{content}", m.content, m.role == "assistant", optional=m.role == "system")
        for i, m in enumerate(sample.messages)
    ]


def empty_fields(sample: Sample) -> list[tuple[str, bool]]:
    """(label, trained) of each required field that is empty or whitespace-only; a label is
    the field's name, or "<role> content" for a chat message."""
    out = []
    for f in sample_fields(sample):
        if f.optional or f.text.strip():
            continue
        label = f.name
        if "[" in f.name:
            label = f"{sample.messages[int(f.name[f.name.index('[') + 1:f.name.index(']')])].role} content"
        out.append((label, f.trained))
    return out


def sample_format(sample: Sample) -> str:
    if isinstance(sample, ChatSample):
        return sample.source_format
    return {TextSample: "text", PromptCompletionSample: "prompt_completion", AlpacaSample: "alpaca"}[type(sample)]


def detect_format(keys) -> str | None:
    """The format whose required fields are all present (chat formats first), or None."""
    keys = set(keys)
    for fmt, required in REQUIRED_FIELDS.items():
        if keys.issuperset(required):
            return fmt
    return None


def parse_sample(value: Any, fmt: str, location: Location) -> Sample:
    """Validates one record for `fmt`; raises BadRecord naming the field."""
    if not isinstance(value, Mapping):
        expected = "a JSON object" if fmt == "auto" else f"an object with the fields of format {fmt}"
        raise BadRecord(location, f"the record is {describe_type(value)}, expected {expected}")
    if fmt == "text":
        return TextSample(location, _string(value, "text", location))
    if fmt == "prompt_completion":
        return PromptCompletionSample(
            location, _string(value, "prompt", location), _string(value, "completion", location)
        )
    if fmt == "alpaca":
        return AlpacaSample(
            location,
            instruction=_string(value, "instruction", location),
            input=_string(value, "input", location, optional=True),
            output=_string(value, "output", location),
            system=_string(value, "system", location, optional=True),
        )
    if fmt == "sharegpt":
        return ChatSample(location, _chat(value, location, "conversations", "from", "value", SHAREGPT_ROLES), "sharegpt")
    if fmt == "messages":
        roles = {role: role for role in CHAT_ROLES}
        return ChatSample(location, _chat(value, location, "messages", "role", "content", roles), "messages")
    raise ValueError(f"unknown format {fmt!r}")


def describe_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _string(record: Any, key: str, location: Location, optional: bool = False, prefix: str = "") -> str:
    name = f"{prefix}.{key}" if prefix else key
    if not isinstance(record, Mapping):
        raise BadRecord(location, f"field '{prefix}' is {describe_type(record)}, expected an object", prefix)
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        if key in record:
            raise BadRecord(location, f"field '{name}' is null, expected a string", name)
        raise BadRecord(location, f"missing field '{name}'", name)
    if not isinstance(value, str):
        raise BadRecord(location, f"field '{name}' is {describe_type(value)}, expected a string", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # json.loads accepts "\ud83d"; tokenizers fail the whole batch on it
        raise BadRecord(location, f"field '{name}' holds {value[e.start]!r} at character {e.start}, half of a "
                        "UTF-16 surrogate pair, which is not text (a broken escape in the data)", name) from None
    return value


def _turns(record: Mapping, key: str, location: Location) -> list:
    value = record.get(key)
    if value is None:
        if key in record:
            raise BadRecord(location, f"field '{key}' is null, expected a list of turns", key)
        raise BadRecord(location, f"missing field '{key}'", key)
    if not isinstance(value, (list, tuple)):
        raise BadRecord(location, f"field '{key}' is {describe_type(value)}, expected a list of turns", key)
    if not value:
        raise BadRecord(location, f"field '{key}' is an empty list; a conversation needs at least one turn", key)
    return list(value)


def _chat(value, location, field: str, role_key: str, text_key: str, roles: dict[str, str]) -> tuple:
    """The turns of a chat record as Messages; `roles` maps the record's role names to ours."""
    messages = []
    for i, turn in enumerate(_turns(value, field, location)):
        where = f"{field}[{i}]"
        role = _string(turn, role_key, location, prefix=where)
        if role not in roles:
            raise BadRecord(
                location,
                f"field '{where}.{role_key}' has unknown role {role!r} (expected one of {', '.join(roles)})",
                f"{where}.{role_key}",
            )
        messages.append(Message(roles[role], _string(turn, text_key, location, prefix=where)))
    return tuple(messages)
