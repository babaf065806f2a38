import pytest

from nanopeft.lab import data
from nanopeft.lab.data import SPLITS, TEAMS, TEMPLATES, Example, check_examples, generate, load_task


def test_generator_is_deterministic_under_a_seed():
    assert generate(50, "train", seed=3) == generate(50, "train", seed=3)
    assert generate(50, "train", seed=3) != generate(50, "train", seed=4)
    assert load_task() == load_task()


def test_every_team_is_present_in_every_split_in_equal_numbers():
    task = load_task()
    assert len(TEAMS) >= 5
    assert (len(task.train), len(task.validation), len(task.test)) == (240, 120, 300)
    for split in (task.train, task.validation, task.test):
        counts = {team: sum(ex.label == team for ex in split) for team in TEAMS}
        assert len(set(counts.values())) == 1, counts


def _core(template):
    """The fixed words of a template (the text between its placeholders), long enough to be a phrasing."""
    import re

    return [piece.strip() for piece in re.split(r"\{[a-z]+\}", template) if len(piece.strip()) > 12]


@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_no_held_out_phrasing_appears_in_another_split(held_out):
    task = load_task()
    texts = {split: "\n".join(ex.text.lower() for ex in getattr(task, split)) for split in SPLITS}
    for label, templates in TEMPLATES.items():
        for template in templates[SPLITS[held_out]]:
            for piece in _core(template):
                for other in set(SPLITS) - {held_out}:
                    assert piece.lower() not in texts[other], (label, piece, other)
    # ...and the held-out phrasings are really used in their split
    mine = [t for ts in TEMPLATES.values() for t in ts[SPLITS[held_out]]]
    used = sum(any(p.lower() in texts[held_out] for p in _core(t)) for t in mine)
    assert used >= 0.8 * len(mine)


def test_tickets_look_like_tickets():
    texts = [ex.text for ex in generate(200, "train")]
    assert any(t.split("\n")[0] in ("Hi,", "Hello,", "Dear support team,") for t in texts)  # greetings
    assert any(t.isupper() for t in (x.split("\n")[1] for x in texts if "\n" in x))  # shouting
    assert len(set(texts)) > 190  # varied


@pytest.mark.parametrize("bad, error", [
    ([], "empty"),
    (None, "empty"),
    (["just a string"], "not nanopeft.lab.data.Example"),
    ([Example("hello", "sales")], "not one of"),
    ([Example("   ", "billing")], "empty ticket"),
])
def test_malformed_examples_get_clear_errors(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        check_examples(bad)


def test_parse_answer():
    assert data.parse_answer(" Billing.") == "billing"
    assert data.parse_answer("shipping<|im_end|>") == "shipping"
    assert data.parse_answer("") == ""


@pytest.mark.slow
def test_prompt_uses_the_chat_template(tokenizer):
    text = data.prompt_text(tokenizer, "My parcel is late")
    assert text.startswith("<|im_start|>system\n" + data.SYSTEM_PROMPT)
    assert "<|im_start|>user\nMy parcel is late<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
