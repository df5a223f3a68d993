"""How the non-chat formats become a prompt and a completion.

With a chat template, alpaca and prompt_completion records become conversations (so the
model sees the format it will be used with); without one, alpaca uses the Stanford Alpaca
prompt and prompt_completion is the prompt followed by the completion, as is.
"""

from __future__ import annotations

from jaxtune.data.formats import AlpacaSample, Message, PromptCompletionSample

# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PROMPT_INPUT = (
    ALPACA_PREAMBLE_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = ALPACA_PREAMBLE_NO_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(sample: AlpacaSample) -> str:
    """The Stanford Alpaca prompt; a non-empty `system` replaces its first paragraph."""
    has_input = bool(sample.input.strip())
    template = ALPACA_PROMPT_INPUT if has_input else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=sample.instruction, input=sample.input)
    if sample.system.strip():
        preamble = ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE_NO_INPUT
        prompt = sample.system + prompt[len(preamble):]
    return prompt


def alpaca_messages(sample: AlpacaSample) -> tuple[Message, ...]:
    user = sample.instruction + ("\n\n" + sample.input if sample.input.strip() else "")
    system = (Message("system", sample.system),) if sample.system.strip() else ()
    return system + (Message("user", user), Message("assistant", sample.output))


def prompt_completion_messages(sample: PromptCompletionSample) -> tuple[Message, ...]:
    return (Message("user", sample.prompt), Message("assistant", sample.completion))
