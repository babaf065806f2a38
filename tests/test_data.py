import pytest

from nanopeft import data
from nanopeft.data import CATEGORIES, TEMPLATES, TRAIN_TEMPLATES, Example, check_examples, generate, load_task


def test_generator_is_deterministic_under_a_seed():
    assert generate(50, "train", seed=3) == generate(50, "train", seed=3)
    assert generate(50, "train", seed=3) != generate(50, "train", seed=4)
    assert load_task() == load_task()


def test_every_category_is_present_in_both_splits():
    task = load_task()
    assert len(CATEGORIES) >= 5
    assert {ex.label for ex in task.train} == set(CATEGORIES)
    assert {ex.label for ex in task.test} == set(CATEGORIES)


def _core(template):
    """The fixed words of a template (the text between its placeholders), long enough to be a phrasing."""
    import re

    return [piece.strip() for piece in re.split(r"\{[a-z]+\}", template) if len(piece.strip()) > 12]


def test_no_test_phrasing_appears_in_training():
    task = load_task()
    train_text = "\n".join(ex.text.lower() for ex in task.train)
    test_text = "\n".join(ex.text.lower() for ex in task.test)
    for label, templates in TEMPLATES.items():
        for template in templates[TRAIN_TEMPLATES:]:
            for piece in _core(template):
                assert piece.lower() not in train_text, (label, piece)
    # ...and the held-out phrasings are really used in the test split
    used = sum(any(p.lower() in test_text for p in _core(t)) for ts in TEMPLATES.values() for t in ts[TRAIN_TEMPLATES:])
    assert used >= 0.8 * sum(len(ts) - TRAIN_TEMPLATES for ts in TEMPLATES.values())


def test_tickets_look_like_tickets():
    texts = [ex.text for ex in generate(200, "train")]
    assert any(t.split("\n")[0] in ("Hi,", "Hello,", "Dear support team,") for t in texts)  # greetings
    assert any(t.isupper() for t in (x.split("\n")[1] for x in texts if "\n" in x))  # shouting
    assert len(set(texts)) > 190  # varied


@pytest.mark.parametrize("bad, error", [
    ([], "empty"),
    (None, "empty"),
    (["just a string"], "not nanopeft.data.Example"),
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
