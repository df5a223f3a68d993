"""Rendering conversations with the tokenizer's chat template and finding the assistant text.

Stock templates (Llama 3, ChatML, ...) have no `{% generation %}` markers, so the assistant
text is found by rendering prefixes: for assistant turn i, the conversation up to turn i
with the generation prompt ends where the turn starts, and the conversation up to and
including turn i ends where it ends (after the template's end-of-turn text). Both must be
prefixes of the whole rendering; a template that renders earlier turns differently once
later turns exist (for example one that drops past reasoning) breaks this and is reported.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxtune.data.formats import Message
from jaxtune.data.records import BadRecord, Location


# Llama 3.1-3.3 templates write "Today Date: <date_string>" into the system header and, unless
# the caller gives `date_string`, take it from the clock (`strftime_now`): the same data then
# tokenized into other rows on another day (a resume with a cold cache was refused as changed
# data), and a batch rendered across midnight had prefixes that did not match its
# conversations (bad records). The templates' own fallback date makes rows reproducible.
TEMPLATE_DATE_STRING = "26 Jul 2024"


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    text: str  # the whole conversation, exactly as apply_chat_template(tokenize=False) renders it
    assistant_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges of the assistant turns
    ends_with_assistant: bool


def render_chats(
    tokenizer, conversations: Sequence[tuple[Message, ...]], locations: Sequence[Location]
) -> list[RenderedChat | BadRecord]:
    """Renders a batch of conversations (batched template calls; one at a time only on failure)."""
    requests: list[tuple[list[dict], bool]] = []  # (messages, add_generation_prompt)
    plans: list[list[tuple[int, int | None]] | BadRecord] = []  # per chat: (prefix request, turn-end request)
    full_index: list[int] = []
    for messages, location in zip(conversations, locations):
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        full_index.append(len(requests))
        requests.append((dicts, False))
        turns: list[tuple[int, int | None]] | BadRecord = []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            if i == 0:
                turns = BadRecord(
                    location,
                    "the conversation starts with an assistant turn; it needs a user (or system) turn before it",
                    "messages[0]",
                )
                break
            prefix_request = len(requests)
            requests.append((dicts[:i], True))
            end_request = None  # the last message: the whole rendering
            if i < len(messages) - 1:
                end_request = len(requests)
                requests.append((dicts[: i + 1], False))
            turns.append((prefix_request, end_request))
        plans.append(turns)

    texts = _render_all(tokenizer, requests)
    out: list[RenderedChat | BadRecord] = []
    for c, (location, turns) in enumerate(zip(locations, plans)):
        full = texts[full_index[c]]
        if isinstance(turns, BadRecord):
            out.append(turns)
            continue
        if isinstance(full, Exception):
            out.append(BadRecord(location, f"the chat template cannot render this conversation ({_why(full)})"))
            continue
        spans = []
        for t, (prefix_req, end_req) in enumerate(turns):
            prefix = texts[prefix_req]
            end_text = full if end_req is None else texts[end_req]
            failed = next((x for x in (prefix, end_text) if isinstance(x, Exception)), None)
            if failed is not None:
                spans = BadRecord(location, f"the chat template cannot render this conversation ({_why(failed)})")
                break
            if not (full.startswith(prefix) and full.startswith(end_text) and len(end_text) >= len(prefix)):
                spans = BadRecord(
                    location,
                    f"the chat template renders the conversation before assistant turn {t + 1} differently from "
                    "the start of the whole conversation, so the assistant tokens cannot be found; jaxtune needs a "
                    "template whose rendering of the first turns is a prefix of the rendering of all turns",
                )
                break
            spans.append((len(prefix), len(end_text)))
        if isinstance(spans, BadRecord):
            out.append(spans)
            continue
        ends_with_assistant = conversations[c][-1].role == "assistant"
        out.append(RenderedChat(full, tuple(spans), ends_with_assistant))
    return out


def _render_all(tokenizer, requests: list[tuple[list[dict], bool]]) -> list[str | Exception]:
    results: list[str | Exception] = [""] * len(requests)
    for flag in (False, True):
        idx = [i for i, (_, gen) in enumerate(requests) if gen == flag]
        if not idx:
            continue
        try:
            texts = tokenizer.apply_chat_template(
                [requests[i][0] for i in idx], tokenize=False, add_generation_prompt=flag,
                date_string=TEMPLATE_DATE_STRING,
            )
        except Exception:  # some conversation in the batch fails: find which, one at a time
            texts = []
            for i in idx:
                try:
                    texts.append(
                        tokenizer.apply_chat_template(requests[i][0], tokenize=False, add_generation_prompt=flag,
                                                      date_string=TEMPLATE_DATE_STRING)
                    )
                except Exception as e:  # the template's raise_exception, jinja errors, ...
                    texts.append(e)
        for i, text in zip(idx, texts):
            results[i] = text
    return results


def _why(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
