"""Samples -> token ids and loss masks, with the model's own tokenizer.

The text of a sample is rendered once (chat template or documented prompt), tokenized once
with character offsets, and a token is trained when its characters overlap a trained span
(the completion, or an assistant turn). The mask is explicit, never derived from
`token != pad`, so an EOS token is trained even when pad == eos.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from jaxtune.data import chat, prompts
from jaxtune.data.formats import AlpacaSample, ChatSample, PromptCompletionSample, Sample, TextSample
from jaxtune.data.records import BadRecord, Location
from jaxtune.errors import UserError, check_local_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, SentencePiece, BPE vocabulary


def load_tokenizer(path: str):
    """The fast tokenizer in a local directory (never downloads, never runs repository code)."""
    import transformers

    if not path:
        raise UserError("no tokenizer: set data.tokenizer_path or model.hf_path to a local directory.")
    check_local_dir(path, "tokenizer")
    # Checked first: given a config.json alone, transformers may build a tokenizer with no
    # vocabulary (every text one token) rather than fail.
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer files (tokenizer.json); copy them there from the original "
                        "model, or set data.tokenizer_path to a directory that has them.")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad directory
        raise UserError(f"cannot load a tokenizer from {path} ({str(e).strip().splitlines()[0]}).") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer in {path} is not a fast tokenizer; jaxtune needs its tokenizer.json.")
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no eos_token; set it in tokenizer_config.json.")
    return tokenizer


def eos_token_ids(tokenizer, *dirs: str) -> frozenset[int]:
    """Tokens that end a turn: the tokenizer's EOS and the `eos_token_id`s of generation_config.json
    in each of `dirs` that has one (the model's and the tokenizer's directory; Llama 3 Instruct
    ends turns with <|eot_id|>, not its EOS, and lists it only there)."""
    ids = {int(tokenizer.eos_token_id)}
    for file in dict.fromkeys(os.path.join(d, "generation_config.json") for d in dirs if d):
        if not os.path.isfile(file):
            continue
        try:
            with open(file) as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError) as e:
            raise UserError(f"{file}: cannot read it ({e}).") from None
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                ids.add(v)
    return frozenset(ids)


@dataclasses.dataclass
class TokenizedSample:
    location: Location
    ids: np.ndarray  # int32 [L]
    mask: np.ndarray  # bool [L]: token t is trained, i.e. its prediction from t-1 counts in the loss

    @property
    def num_trained(self) -> int:
        """Trained targets: the first token is never a target."""
        return int(np.count_nonzero(self.mask[1:]))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The text to tokenize and which characters are trained."""

    text: str
    spans: tuple[tuple[int, int], ...]
    chat: bool  # rendered by the chat template: it holds its own BOS, and turns end with EOS-like tokens
    ends_with_assistant: bool = True


class SampleEncoder:
    """Turns samples into TokenizedSamples; one batched template render and tokenizer call per batch."""

    def __init__(self, tokenizer, *, train_on_prompt: bool, eos_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        self.eos_id = int(tokenizer.eos_token_id)
        self.eos_ids = np.array(sorted(eos_ids | {self.eos_id}), np.int64)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, samples: Sequence[Sample]) -> list[TokenizedSample | BadRecord]:
        return self.tokenize(samples, self.plan(samples))

    def plan(self, samples: Sequence[Sample]) -> list[_Plan | BadRecord]:
        """The text of each sample and its trained character spans (renders chat templates)."""
        plans: list[_Plan | BadRecord | None] = [None] * len(samples)
        chats: list[int] = []
        for i, s in enumerate(samples):
            if isinstance(s, TextSample):
                plans[i] = _Plan(s.text, ((0, len(s.text)),), chat=False)
            elif isinstance(s, ChatSample):
                if not self.has_template:
                    raise UserError(
                        f"{s.location}: format {s.source_format} needs a chat template, but the tokenizer has none "
                        "(add chat_template to its tokenizer_config.json or a chat_template.jinja file)."
                    )
                chats.append(i)
            elif self.has_template:
                chats.append(i)
            else:
                prompt = prompts.alpaca_prompt(s) if isinstance(s, AlpacaSample) else s.prompt
                completion = s.output if isinstance(s, AlpacaSample) else s.completion
                text = prompt + completion
                plans[i] = _Plan(text, ((len(prompt), len(text)),), chat=False)
        if chats:
            conversations = [self._messages(samples[i]) for i in chats]
            rendered = chat.render_chats(self.tokenizer, conversations, [samples[i].location for i in chats])
            for i, r in zip(chats, rendered):
                if isinstance(r, BadRecord):
                    plans[i] = r
                else:
                    plans[i] = _Plan(r.text, r.assistant_spans, chat=True, ends_with_assistant=r.ends_with_assistant)
        return plans

    def tokenize(self, samples: Sequence[Sample], plans: list[_Plan | BadRecord]) -> list[TokenizedSample | BadRecord]:
        """Token ids and masks of planned samples (one tokenizer call per kind); BadRecords stay."""
        out: list[TokenizedSample | BadRecord] = list(plans)
        for is_chat in (False, True):
            idx = [i for i, p in enumerate(plans) if isinstance(p, _Plan) and p.chat == is_chat]
            if not idx:
                continue
            # Templates render BOS themselves; the documented prompts get the tokenizer's BOS.
            enc = self.tokenizer(
                [plans[i].text for i in idx], add_special_tokens=not is_chat,
                return_offsets_mapping=True, return_attention_mask=False,
            )
            for i, ids, offsets in zip(idx, enc["input_ids"], enc["offset_mapping"]):
                out[i] = self._mask(samples[i].location, plans[i], ids, offsets)
        return out

    @staticmethod
    def _messages(sample: Sample):
        if isinstance(sample, ChatSample):
            return sample.messages
        if isinstance(sample, AlpacaSample):
            return prompts.alpaca_messages(sample)
        assert isinstance(sample, PromptCompletionSample)
        return prompts.prompt_completion_messages(sample)

    def _mask(self, location: Location, plan: _Plan, ids, offsets) -> TokenizedSample:
        ids = np.asarray(ids, np.int32)
        offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        is_eos = np.isin(ids, self.eos_ids)
        mask = np.zeros(len(ids), bool)
        last_span_has_eos = False
        for start, end in plan.spans:
            in_span = (ends > start) & (starts < end)
            if plan.chat:
                # Train the turn up to its end-of-turn token, not the whitespace a template puts after it.
                eos_in_span = np.flatnonzero(in_span & is_eos)
                last_span_has_eos = eos_in_span.size > 0
                if last_span_has_eos:
                    in_span[eos_in_span[-1] + 1:] = False
            mask |= in_span
        append_eos = (not plan.chat and (len(ids) == 0 or ids[-1] != self.eos_id)) or (
            plan.chat and plan.ends_with_assistant and plan.spans and not last_span_has_eos
        )
        if append_eos:
            ids = np.append(ids, np.int32(self.eos_id))
            mask = np.append(mask, True)
        elif not plan.chat:
            mask[-1] = True  # the EOS the tokenizer's post-processor appended
        if self.train_on_prompt:
            mask[:] = True
        return TokenizedSample(location, ids, mask)
