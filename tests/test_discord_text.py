"""Splitting long replies for Discord without breaking code blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord_text import DISCORD_LIMIT, split_message


def _fences_balanced(part: str) -> bool:
    return sum(1 for line in part.split("\n") if line.lstrip().startswith("```")) % 2 == 0


def test_a_5000_character_answer_with_a_code_block_splits_into_renderable_messages() -> None:
    prose = "This is a sentence about raycord. " * 40
    code = "\n".join(f"    value_{i} = compute({i})  # step {i}" for i in range(80))
    answer = f"{prose}\n\n```python\n{code}\n```\n\n{prose}"
    assert len(answer) > 5000
    parts = split_message(answer)
    assert len(parts) >= 3
    assert all(len(p) <= DISCORD_LIMIT for p in parts)
    assert all(_fences_balanced(p) for p in parts)
    reopened = [p for p in parts[1:] if p.startswith("```python\n")]
    assert reopened, "a block cut by a split is reopened with its language"
    # nothing is lost: stripping the fences we added gives back the code lines in order
    joined = "\n".join(parts)
    for i in range(80):
        assert f"value_{i} = compute({i})" in joined


def test_short_text_is_one_message_and_prose_splits_on_sentences() -> None:
    assert split_message("hello") == ["hello"]
    prose = "".join(f"Sentence number {i} ends here. " for i in range(200))
    parts = split_message(prose)
    assert all(len(p) <= DISCORD_LIMIT for p in parts)
    assert all(p.rstrip().endswith(".") for p in parts)
    assert "".join(parts) == prose


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .\n`py")), max_size=9000))
def test_every_part_fits_and_keeps_fences_balanced(text: str) -> None:
    parts = split_message(text)
    assert all(len(p) <= DISCORD_LIMIT for p in parts)
    if _fences_balanced(text):
        assert all(_fences_balanced(p) for p in parts)
