"""Where a llama.cpp generation starts (runners/prompt_states.py), driven with a fake context that
fails the way llama.cpp's does: a recurrent memory refuses to be cut to a shorter prefix."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from runners.prompt_states import PromptStates, usable_prefix


class FakeContext:
    """One sequence: `held` is what its state holds. A snapshot is `state_bytes` bytes naming
    its tokens, so a restore can be checked against what was saved."""

    def __init__(self, *, truncatable: bool = True, state_bytes: int = 100) -> None:
        self.truncatable = truncatable
        self.state_bytes = state_bytes
        self.tokens: list[int] = []
        self.restored: list[tuple[int, ...]] = []
        self.refuse_restore = False

    def held(self) -> Sequence[int]:
        return list(self.tokens)

    def keep(self, n: int) -> None:
        if 0 < n < len(self.tokens) and not self.truncatable:
            raise AssertionError(f"a recurrent state cut to {n} of {len(self.tokens)} tokens")
        del self.tokens[n:]

    def snapshot(self) -> bytes:
        return repr(tuple(self.tokens)).encode().ljust(self.state_bytes)[: self.state_bytes]

    def restore(self, tokens: Sequence[int], state: bytes) -> bool:
        if self.refuse_restore:
            self.tokens = []
            return False
        assert state == repr(tuple(tokens)).encode().ljust(self.state_bytes)[: self.state_bytes]
        self.tokens = list(tokens)
        self.restored.append(tuple(tokens))
        return True

    def evaluate(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)


def run(states: PromptStates, context: FakeContext, prompt: list[int], answer: int = 3) -> int:
    """A generation as the runner does it: start, evaluate the rest and an answer, save.
    Returns how many prompt tokens were evaluated."""
    start = states.start(prompt)
    assert context.tokens == prompt[:start]
    context.evaluate(prompt[start:])
    context.evaluate([900 + i for i in range(answer)])
    states.save(len(prompt))
    return len(prompt) - start


TOOLS = list(range(1000, 1300))  # a long shared prefix: system prompt and tools
FIRST = [*TOOLS, 1, 2, 3]
TITLE = [7, 8, 9]
SECOND = [*FIRST, 900, 901, 902, 4, 5]  # the first prompt, its answer, a new message


@pytest.mark.parametrize("truncatable", [True, False])
def test_a_title_request_in_between_costs_the_next_message_only_its_new_tokens(
    truncatable: bool,
) -> None:
    context = FakeContext(truncatable=truncatable)
    states = PromptStates(context, budget_bytes=10_000, min_tokens=100)
    assert run(states, context, FIRST) == len(FIRST)
    assert run(states, context, TITLE) == len(TITLE)
    assert run(states, context, SECOND) == 2
    assert context.restored == [(*FIRST, 900, 901, 902)]


def test_the_live_context_is_used_when_it_holds_more_than_any_saved_state() -> None:
    context = FakeContext()
    states = PromptStates(context, budget_bytes=10_000, min_tokens=100)
    run(states, context, FIRST)
    assert run(states, context, SECOND) == 2
    assert context.restored == []


@pytest.mark.parametrize(
    ("held", "prompt", "truncatable", "usable"),
    [
        ([1, 2, 3], [1, 2, 3, 4], True, 3),
        ([1, 2, 3], [1, 2, 3, 4], False, 3),
        # The whole prompt held: one token is evaluated again, for fresh logits.
        ([1, 2, 3], [1, 2, 3], True, 2),
        ([1, 2, 3], [1, 2, 3], False, 0),
        # A state that went past where the prompts part: cut it, unless it cannot be cut.
        ([1, 2, 3, 9], [1, 2, 3, 4], True, 3),
        ([1, 2, 3, 9], [1, 2, 3, 4], False, 0),
        ([5], [1, 2], True, 0),
        ([], [1, 2], False, 0),
    ],
)
def test_usable_prefix(held: list[int], prompt: list[int], truncatable: bool, usable: int) -> None:
    assert usable_prefix(held, prompt, truncatable=truncatable) == usable


def test_a_recurrent_state_that_went_past_the_prompt_is_not_cut_but_started_afresh() -> None:
    context = FakeContext(truncatable=False)
    states = PromptStates(context, budget_bytes=10_000, min_tokens=100)
    run(states, context, FIRST)  # holds FIRST and its answer 900 901 902
    other_answer = [*FIRST, 950, 4]  # the history renders another answer
    run(states, context, TITLE)
    assert run(states, context, other_answer) == len(other_answer)  # FakeContext.keep would raise
    assert context.restored == []


def test_a_recurrent_checkpoint_at_a_message_boundary_serves_the_next_message() -> None:
    context = FakeContext(truncatable=False)
    states = PromptStates(context, budget_bytes=10_000, min_tokens=100)
    states.start(FIRST)
    context.evaluate(TOOLS)
    states.checkpoint()  # the runner's checkpoint where the last message starts
    context.evaluate(FIRST[len(TOOLS) :])
    run(states, context, TITLE)
    rewritten = [*TOOLS, 1, 2, 3, 960, 4]  # the first answer rendered otherwise
    assert run(states, context, rewritten) == len(rewritten) - len(TOOLS)


def test_the_least_recently_used_state_goes_first_when_the_budget_is_full() -> None:
    context = FakeContext(state_bytes=1000)
    per_state = 1000 + 4 * (len(FIRST) + 3)
    budget = 2 * per_state + 200  # room for two states (one grown by a message), not three
    states = PromptStates(context, budget_bytes=budget, min_tokens=100)
    a, b, c = ([n, *FIRST[1:]] for n in (11, 12, 13))
    run(states, context, a)
    run(states, context, b)
    run(states, context, TITLE)
    assert run(states, context, [*a, 900, 901, 902, 5]) == 1  # a restored: now the newest
    run(states, context, c)  # evicts b, not a
    assert len(states) == 2 and states.nbytes <= budget
    run(states, context, TITLE)
    assert run(states, context, [*a, 900, 901, 902, 6]) == 1
    assert run(states, context, [*b, 900, 901, 902, 6]) == len(b) + 4


def test_no_state_is_kept_over_the_budget_or_with_a_budget_of_zero() -> None:
    context = FakeContext(state_bytes=1000)
    for budget in (0, 999):
        states = PromptStates(context, budget_bytes=budget, min_tokens=100)
        run(states, context, FIRST)
        assert len(states) == 0 and states.nbytes == 0


def test_short_prompts_are_not_saved_and_a_longer_state_replaces_its_own_prefix() -> None:
    context = FakeContext()
    states = PromptStates(context, budget_bytes=100_000, min_tokens=100)
    run(states, context, TITLE)
    assert len(states) == 0
    run(states, context, FIRST)
    run(states, context, SECOND)
    assert len(states) == 1  # SECOND's state holds FIRST's: one is enough when it can be cut


def test_a_context_used_elsewhere_is_not_trusted_and_a_refused_restore_starts_afresh() -> None:
    context = FakeContext()
    states = PromptStates(context, budget_bytes=100_000, min_tokens=100)
    run(states, context, FIRST)
    states.forget_live()  # the image path evaluated embeddings where these tokens stand
    context.refuse_restore = True
    assert run(states, context, SECOND) == len(SECOND)
    assert len(states) == 1  # the refused state was dropped, SECOND's saved


def test_clear_frees_every_state() -> None:
    context = FakeContext()
    states = PromptStates(context, budget_bytes=100_000, min_tokens=100)
    run(states, context, FIRST)
    assert states.nbytes > 0
    states.clear()
    assert states.nbytes == 0 and len(states) == 0


def test_checked_prompts_serve_only_the_same_request_once_and_stay_bounded() -> None:
    from runners.chat import CheckedPrompts, GenerationRequest

    kept: CheckedPrompts[list[int]] = CheckedPrompts(2)
    first, twin = (GenerationRequest(messages=[{"role": "user", "content": "hi"}]) for _ in "ab")
    kept.keep(first, [1, 2])
    assert kept.take(twin) is None  # an equal request is not the one checked
    assert kept.take(first) == [1, 2] and kept.take(first) is None  # once
    requests = [GenerationRequest(messages=[]) for _ in range(3)]
    for index, request in enumerate(requests):
        kept.keep(request, [index])
    assert kept.take(requests[0]) is None  # the oldest went
    assert kept.take(requests[2]) == [2]
    kept.clear()
    assert kept.take(requests[1]) is None
