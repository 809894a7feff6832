"""The output processor: sampled tokens in, per-sequence deltas out — incremental detokenization, stop strings,
logprobs, and what each sequence has sent. It owns every request's output state from the moment the engine adds
the request until its last sequence finishes or it is aborted (vLLM v1's ``OutputProcessor``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

from hyla.serve.scheduler import Request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, most likely first


@dataclass
class RequestOutput:
    """What one step added to one sequence. ``text`` is the new text (held back while it could still turn
    out to be the start of a stop string); ``finish_reason`` is set on the last: "stop" or "length"."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SequenceText:
    """A sequence's output text so far and how much of it (and of its tokens) went out already.

    The text is decoded incrementally (:meth:`update`): ``settled`` is the text of the first ``read`` output
    tokens, which ends with a whole character; each new token decodes only the window from ``prefix`` (the
    tokens before ``read`` that the tokenizer's decoder sees as context) instead of the whole output."""

    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    settled: str = ""
    prefix: int = 0
    read: int = 0

    def update(self, tokenizer: Tokenizer, ids: list[int]) -> None:
        """Set ``text`` to the decoding of ``ids`` (the output so far), decoding the last few tokens only."""
        before = tokenizer.decode(ids[self.prefix : self.read])
        window = tokenizer.decode(ids[self.prefix :])
        if window.startswith(before):
            self.text = self.settled + window[len(before) :]
        else:  # a decoder that rewrites earlier text given more: decode it all, take it as context
            self.text, self.settled, self.prefix, self.read = tokenizer.decode(ids), "", 0, 0
        if not self.text.endswith("\ufffd"):  # whole characters: the next window starts here
            self.settled, self.prefix, self.read = self.text, self.read, len(ids)


class OutputProcessor:
    """Each request's sequences and their :class:`SequenceText`, from :meth:`add` to the last sequence's finish
    (or :meth:`abort`): the one place a request's output state lives and is removed."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, list[Request]] = {}  # request id -> its sequences, index order
        self._texts: dict[tuple[str, int], SequenceText] = {}

    def add(self, request_id: str, sequences: list[Request]) -> None:
        self.requests[request_id] = sequences
        for sequence in sequences:
            self._texts[sequence.key] = SequenceText()

    def abort(self, request_id: str) -> list[Request]:
        """Forget a request; returns its sequences (the engine finishes those still running)."""
        sequences = self.requests.pop(request_id, [])
        for sequence in sequences:
            self._texts.pop(sequence.key, None)
        return sequences

    def num_sequences(self) -> int:
        return sum(len(group) for group in self.requests.values())

    def process(
        self, request: Request, token: int, logprob: TokenLogprob | None, upto: int | None = None
    ) -> RequestOutput:
        """The delta of a sequence that sampled ``token``, its output number ``upto`` (default: the last; the
        scheduler already appended it, and set ``finish_reason`` if a stop token or the length ended the sequence
        there). A stop string in the text sets the output's ``finish_reason`` to "stop" (the engine then finishes
        the sequence) and cuts the text before it."""
        upto = len(request.output_ids) if upto is None else upto
        state = self._texts[request.key]
        if logprob is not None:
            state.logprobs.append(logprob)
        reason = request.finish_reason if upto == len(request.output_ids) else None
        if reason != "stop" or token not in request.stop_ids:  # a stop token adds no text
            state.update(self.tokenizer, request.output_ids[:upto])
            if self._cut_at_stop_string(request, state, upto):
                reason = "stop"
        return self._delta(request, state, reason, upto)

    def _cut_at_stop_string(self, request: Request, state: SequenceText, upto: int) -> bool:
        """Cut the text before the first stop string; whether there was one."""
        stops = request.params.stop
        if not stops or upto < request.params.min_tokens:
            return False
        start = max(state.sent_chars - max(map(len, stops)), 0)
        found = [i for i in (state.text.find(s, start) for s in stops) if i >= 0]
        if not found:
            return False
        state.text = state.text[: min(found)]
        return True

    def _delta(self, request: Request, state: SequenceText, reason: str | None, upto: int) -> RequestOutput:
        end = len(state.text)
        if reason is None:
            # Hold back what could be the start of a stop string, or an incomplete UTF-8 character.
            end -= max(map(len, request.params.stop), default=1) - 1
            while end > state.sent_chars and state.text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, state.sent_chars)
        text, state.sent_chars = state.text[state.sent_chars : end], end
        new_tokens = request.output_ids[state.sent_tokens : upto]
        new_logprobs = state.logprobs[state.sent_tokens :]
        state.sent_tokens = upto
        if reason is not None:
            self._texts.pop(request.key)
            group = self.requests.get(request.request_id, [])
            if all(s.key not in self._texts for s in group):  # every sequence of the request has finished
                self.requests.pop(request.request_id, None)
        return RequestOutput(request.request_id, request.index, new_tokens, text, new_logprobs,
                             len(request.prompt_ids), upto, reason,
                             request.num_cached_tokens)  # fmt: skip
