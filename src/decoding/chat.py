"""Chat with a decoder: messages rendered with the export's chat template, answers decoded."""

from __future__ import annotations

from src.decoding.base import GenerationResult
from src.decoding.decoder import Decoder


def chat_prompt_ids(decoder: Decoder, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the chat template, ending with the assistant
    header (what the model continues)."""
    tokenizer = decoder.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Chat:
    """A conversation with a decoder; `reply` decodes the assistant's next turn."""

    def __init__(self, decoder: Decoder, *, system: str | None = None) -> None:
        self.decoder = decoder
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def reply(self, user: str) -> tuple[str, GenerationResult]:
        """The assistant's answer to `user` (kept in the conversation) and its decode stats."""
        self.messages.append({"role": "user", "content": user})
        result = self.decoder.generate([chat_prompt_ids(self.decoder, self.messages)])
        answer = self.decoder.tokenizer.decode(result.tokens[0], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, result
