"""The task: route customer-support tickets to the right team.

A seeded generator writes realistic tickets for a small electronics-and-services shop: a greeting (or none), the
customer's problem in one of many phrasings, sometimes a second detail, order numbers, typos, shouting, a sign-off.
Each ticket is labelled with one of six teams. The model reads the ticket through its chat template and must
answer with the team's name; `evaluate` decodes greedily and counts exact matches.

Held-out phrasings: every team has its own list of problem templates, split three ways. Training tickets use the
first 11, test tickets the next 5, validation tickets the last 3: the test and validation splits only use phrasings
the model never trained on, so a high score means it learned the routing, not the sentences. Validation is for
choosing hyperparameters (learning rates); the test split is scored once per finished run.

    task = load_task()                      # fixed train (240), validation (120) and test (300) splits
    evaluate(model, tokenizer, task.test)   # -> accuracy in [0, 1]
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

TEAMS = ("billing", "shipping", "technical", "account", "returns", "feedback")

SYSTEM_PROMPT = "Route the support ticket to one team: " + ", ".join(TEAMS) + ". Answer with the team only."

PRODUCTS = (
    "SmartHome Hub", "FitBand 3 watch", "AeroBuds earbuds", "Barista Pro coffee machine", "Trailrunner backpack",
    "PixelView monitor", "CloudDrive Plus plan", "Nimbus router", "StudyPal tablet", "VoltGo e-scooter",
)
CITIES = ("Leeds", "Austin", "Lyon", "Osaka", "Porto", "Denver", "Kraków", "Dublin", "Pune", "Melbourne")
MONTHS = ("January", "March", "April", "June", "August", "October", "November")

# Problem templates per team, split three ways by SPLITS: training, test, validation (each phrasing in one split
# only). Placeholders: {product} {order} {amount} {city} {days} {code} {month} {n}.
TEMPLATES = {
    "billing": [
        "I was charged twice for my {product} order #{order}.",
        "My card was billed ${amount} but the invoice says a different amount.",
        "Why is there an extra charge of ${amount} on my statement this month?",
        "Can you send me a VAT invoice for order #{order}? Accounting needs it.",
        "The subscription for my {product} renewed even though I cancelled it in {month}.",
        "My payment keeps getting declined at checkout, card is fine everywhere else.",
        "I was promised a discount code but got billed the full ${amount}.",
        "You took money from my account for an order I never placed.",
        "The price went up on my {product} plan and nobody told me, I want the old rate.",
        "I need to change the credit card you have on file for monthly payments.",
        "There's a pending authorization of ${amount} that never cleared, please release it.",
        "The receipt shows tax I shouldn't pay as a business customer.",
        "I paid by bank transfer {days} days ago and the order still says awaiting payment.",
        "My statement has a charge from you labelled {code} that I don't recognise.",
        "Please split the payment for order #{order} across two cards.",
        "I got an overdue notice but I paid the ${amount} bill on time.",
        "Your invoice lists a service fee of ${amount} that was never mentioned when I signed up.",
        "Can I pay for order #{order} in three monthly instalments instead of all at once?",
        "I was refunded ${amount} less than I paid, the numbers do not add up.",
    ],
    "shipping": [
        "My {product} hasn't arrived yet, it's been {days} days since I ordered.",
        "The tracking number for order #{order} doesn't show any updates.",
        "The courier says it was delivered but there's nothing at my door in {city}.",
        "Can I change the delivery address for order #{order}? I'm moving to {city}.",
        "Do you ship the {product} to {city}, and how long does it take?",
        "The parcel has been stuck at the depot in {city} for {days} days.",
        "I paid for express delivery and it still took {days} days.",
        "The box arrived crushed and soaking wet from the delivery van.",
        "Only half of my order #{order} was delivered, the rest is missing.",
        "Where is my package? Order #{order}, placed on {month} {n}.",
        "The delivery driver left my {product} with a neighbour I don't know.",
        "Can you hold my order at the pickup point in {city} instead of home delivery?",
        "It says out for delivery since yesterday morning and still nothing.",
        "My parcel has been held at customs in {city} for {days} days with no update.",
        "I need the {product} before {month} {n}, can you upgrade the shipping?",
        "The courier keeps rescheduling my delivery and never shows up.",
        "The estimated arrival date for my {product} keeps moving back every day.",
        "My order #{order} went to my old address in {city}, how do I get it back?",
        "Is weekend delivery available for the {product}? I work all week.",
    ],
    "technical": [
        "My {product} keeps restarting every few minutes.",
        "The app crashes as soon as I open the settings page.",
        "I get error {code} when I try to pair the {product} with my phone.",
        "The {product} won't turn on anymore, the light just blinks red.",
        "After the latest firmware update the {product} is really slow.",
        "Bluetooth keeps disconnecting from my {product} every few seconds.",
        "The screen on my {product} flickers when brightness is low.",
        "Sync fails with error {code} and my files are not uploading.",
        "The {product} overheats after about {n} minutes of use.",
        "The battery on my {product} drains from full to zero in an hour.",
        "The touch controls stopped responding after I installed the update.",
        "My {product} shows a spinning wheel forever when it boots.",
        "The wifi setup wizard fails at the last step with code {code}.",
        "Sound cuts out on the {product} whenever I walk away from my laptop.",
        "The companion app can't find the {product} even though it's right next to the phone.",
        "Every time I charge the {product} it beeps and shows a warning icon.",
        "The {product} makes a loud clicking noise when it starts up.",
        "Voice commands stopped working on the {product} since {month}.",
        "The display on my {product} shows random characters after waking from sleep.",
    ],
    "account": [
        "I can't log in, it says my password is wrong but I just reset it.",
        "Please delete my account and all my personal data.",
        "I never get the two-factor code by SMS so I'm locked out.",
        "How do I change the email address on my account?",
        "Someone else logged into my account from {city}, I think I was hacked.",
        "My account got locked after too many login attempts.",
        "I want to merge my two accounts, I have one for work and one personal.",
        "The password reset link in the email has already expired.",
        "I can't update my phone number in the profile settings.",
        "Please unsubscribe me from your marketing emails, I keep getting them.",
        "How can I download a copy of the personal data you hold about me?",
        "I lost access to the email I signed up with, how do I recover my login?",
        "My username shows someone else's name after I logged in.",
        "I want to add my partner as a second user on the account.",
        "The sign-in page loops back to the start every time I enter my details.",
        "Can you turn off the security questions on my profile?",
        "I get logged out of the app every few minutes and have to sign in again.",
        "How do I change the name on my profile after getting married?",
        "My verification email never arrives so I cannot activate my account.",
    ],
    "returns": [
        "I'd like to return the {product}, it's not what I expected.",
        "How do I send back order #{order}? I need a return label.",
        "The {product} I received is the wrong colour, I want to exchange it.",
        "Can I still return the {product}? I bought it {days} days ago.",
        "I sent the {product} back two weeks ago and still haven't got my refund.",
        "The {product} stopped working after a month, I want a replacement under warranty.",
        "I ordered the wrong size and need to swap it for a bigger one.",
        "Where do I drop off a return in {city}?",
        "My return for order #{order} was rejected and I don't understand why.",
        "The item came damaged, I want my money back not a repair.",
        "I changed my mind about the {product}, it's still sealed in the box.",
        "Can you pick up the {product} from my house for the return?",
        "Is there a restocking fee if I send back the {product}?",
        "I got a gift {product} and want to exchange it for store credit.",
        "The replacement you sent has the same fault, I want a full refund this time.",
        "I returned only one item of order #{order}, how much will I get back?",
        "The {product} does not fit my needs, what is the deadline to send it back?",
        "I need a prepaid shipping label to return order #{order} from {city}.",
        "Can I return just the charger from my {product} bundle?",
    ],
    "feedback": [
        "Just wanted to say the {product} is fantastic, best purchase this year.",
        "Your support agent Maria was really helpful last week, thank you!",
        "Suggestion: the app should have a dark mode.",
        "I love the {product} but wish it came in more colours.",
        "The new website design is much harder to navigate than the old one.",
        "It would be great if the {product} had a longer cable.",
        "Thanks for the quick delivery, really impressed with the service.",
        "Please consider offering plastic-free packaging.",
        "Your checkout process is confusing, too many steps.",
        "The {product} manual is very well written, a pleasure to read.",
        "I think the {product} is overpriced compared to others, just my opinion.",
        "Would you add a wishlist feature to the app? I'd use it a lot.",
        "Happy customer here, the {product} changed my morning routine.",
        "The store staff in {city} were friendly and patient with me.",
        "Idea: let customers pick a delivery time slot in the app.",
        "Not a complaint, just feedback: the {product} box is hard to open.",
        "The instructions for the {product} could use more pictures.",
        "Your hold music is lovely, but the wait was {n} minutes long.",
        "Great job on the recent app update, it feels much faster.",
    ],
}
# per team: templates [0, 11) for training, [11, 16) for testing, [16, 19) for validation
SPLITS = {"train": slice(0, 11), "test": slice(11, 16), "validation": slice(16, 19)}

GREETINGS = ("Hi,", "Hello,", "Hey there,", "Good morning,", "Dear support team,", "Hi team,", "Hello support,", "")
DETAILS = (
    "This is really frustrating.", "Please help asap.", "I've been a customer for {n} years.",
    "I already tried turning it off and on.", "Order number is #{order} if you need it.",
    "My name is on the account as J. {surname}.", "I'm writing from my phone, sorry for typos.",
    "Thanks in advance.", "Could you get back to me today?", "I contacted you before about something else.",
    "",
)
SIGNOFFS = ("Thanks", "Regards", "Best", "Cheers", "Thank you", "Sent from my phone", "", "")
SURNAMES = ("Okafor", "Schmidt", "Nguyen", "García", "Kowalski", "Smith", "Tanaka", "Rossi")


@dataclass(frozen=True)
class Example:
    """One ticket and the team it should go to."""

    text: str
    label: str


@dataclass(frozen=True)
class Task:
    train: list
    validation: list
    test: list
    teams: tuple = TEAMS


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        product=rng.choice(PRODUCTS), order=rng.randint(10000, 99999), amount=f"{rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
        city=rng.choice(CITIES), days=rng.randint(3, 30), code=f"E{rng.randint(100, 999)}", month=rng.choice(MONTHS),
        n=rng.randint(2, 28), surname=rng.choice(SURNAMES),
    )


def _noise(text: str, rng: random.Random) -> str:
    """Real tickets are messy: sometimes all lower case, a dropped letter, SHOUTING, or a trailing '!!'."""
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.22:
        text = text.upper()
    if rng.random() < 0.2:  # one typo: drop a letter from a longer word
        words = text.split(" ")
        i = rng.randrange(len(words))
        if len(words[i]) > 4:
            j = rng.randrange(1, len(words[i]) - 1)
            words[i] = words[i][:j] + words[i][j + 1:]
        text = " ".join(words)
    if rng.random() < 0.1:
        text = text.rstrip(".") + "!!"
    return text


def make_ticket(template: str, rng: random.Random) -> str:
    """A ticket: optional greeting, the problem (from `template`), an optional detail, an optional sign-off."""
    parts = [rng.choice(GREETINGS), _noise(_fill(template, rng), rng), _fill(rng.choice(DETAILS), rng)]
    signoff = rng.choice(SIGNOFFS)
    if signoff:
        parts.append(f"{signoff},\n{rng.choice(('Sam', 'Priya', 'Tom', 'Aiko', 'Lena', 'Omar', 'Chris'))}")
    return "\n".join(p for p in parts if p)


def generate(n: int, split: str = "train", seed: int = 0) -> list:
    """`n` tickets, balanced over teams, from the templates of `split` ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(f"{seed}-{split}")
    examples = []
    for i in range(n):
        label = TEAMS[i % len(TEAMS)]
        pool = TEMPLATES[label][SPLITS[split]]
        examples.append(Example(make_ticket(rng.choice(pool), rng), label))
    rng.shuffle(examples)
    return examples


def load_task(n_train: int = 240, n_validation: int = 120, n_test: int = 300, seed: int = 0) -> Task:
    """The fixed splits every notebook uses (same seed, same tickets, on every machine).

    300 test tickets: at 50% accuracy one run's score then carries about +-2.9 points of binomial noise (one
    standard error, sqrt(0.5 * 0.5 / 300)), against +-6.5 with the 60 tickets we began with."""
    return Task(train=generate(n_train, "train", seed), validation=generate(n_validation, "validation", seed),
                test=generate(n_test, "test", seed))


# --- prompts -------------------------------------------------------------------------------------------------------

def check_examples(examples, name: str = "examples") -> list:
    """Raise a clear error for an empty or malformed example list; return it as a list."""
    if examples is None or len(examples) == 0:
        raise ValueError(f"{name} is empty: pass a non-empty list of nanopeft.lab.data.Example (e.g. load_task().train).")
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise TypeError(
                f"{name}[{i}] is a {type(ex).__name__}, not nanopeft.lab.data.Example; build one with "
                f"Example(text='...', label='billing')."
            )
        if not isinstance(ex.text, str) or not ex.text.strip():
            raise ValueError(f"{name}[{i}] has an empty ticket text.")
        if ex.label not in TEAMS:
            raise ValueError(f"{name}[{i}] has label {ex.label!r}, which is not one of {TEAMS}.")
    return examples


def prompt_text(tokenizer, ticket: str) -> str:
    """The ticket wrapped in the model's chat template, ending where the assistant's answer begins."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ticket}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_text(tokenizer, label: str) -> str:
    """What the model should write after the prompt: the team name, then the end-of-turn token."""
    return label + (tokenizer.eos_token or "")


def parse_answer(text: str) -> str:
    """The first word of a generated answer, lower-cased, without punctuation ('Billing.' -> 'billing')."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


@torch.no_grad()
def predict(model, tokenizer, texts, batch_size: int = 16, max_new_tokens: int = 4) -> list:
    """Greedy answers (parsed to one word) for a list of ticket texts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    answers = []
    try:
        for start in range(0, len(texts), batch_size):
            prompts = [prompt_text(tokenizer, t) for t in texts[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )  # (B, T + new)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += [parse_answer(s) for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def correct(model, tokenizer, examples, batch_size: int = 16) -> list:
    """For each ticket, whether the greedy answer is exactly the right team (a list of bools, in order): what the
    statistics resample (`nanopeft.course.stats`)."""
    examples = check_examples(examples)
    answers = predict(model, tokenizer, [ex.text for ex in examples], batch_size=batch_size)
    return [a == ex.label for a, ex in zip(answers, examples)]


def evaluate(model, tokenizer, examples, batch_size: int = 16) -> float:
    """Accuracy: the fraction of tickets whose greedy answer is exactly the right team."""
    hits = correct(model, tokenizer, examples, batch_size)
    return sum(hits) / len(hits)
