"""Transcripts for the demo corpus: emotion-bearing sentence templates, plus neutral and ambiguous
ones that any speaker may say in any state, so that text alone cannot be perfect (as in real acted
corpora, where "Really?" can be happy, angry or sad)."""

from __future__ import annotations

import numpy as np

THINGS = ["the car", "the house", "my job", "the trip", "the garden", "the concert", "the letter",
          "the project", "the dog", "the exam", "the wedding", "the old photos", "the new kitchen",
          "the results", "the phone call", "the weekend"]
PEOPLE = ["my brother", "Anna", "the neighbours", "my boss", "our teacher", "David", "my sister",
          "the doctor", "your friend", "Maria"]

# Long templates (about 1.5-3 s of speech); {t} = a thing, {p} = a person.
LONG = {
    "neu": ["The meeting about {t} starts at three.", "I put {t} on the list for Monday.",
            "{p} said the report on {t} is finished.", "We can talk about {t} after lunch.",
            "The forecast says it will rain tomorrow.", "Please send me the details about {t}.",
            "I think {p} is working from home today.", "The bus to the station leaves at nine.",
            "There are four chairs next to the window.", "I will check {t} again next week."],
    "hap": ["I'm so happy about {t}, it's wonderful!", "This is great news, I love {t}!",
            "We did it, {t} was a huge success!", "Oh, {p} is coming, how lovely!",
            "I'm thrilled, {t} turned out perfect!", "What a fantastic day, thank you so much!",
            "I'm delighted with {t}, it's brilliant!", "Yay, {p} finally said yes!",
            "That's amazing, I'm so glad for you!", "I can't stop smiling about {t}!"],
    "ang": ["I'm furious about {t}, this is outrageous!", "How dare {p} lie to me again!",
            "Stop it right now, I've had enough!", "This is ridiculous, who ruined {t}?",
            "Don't you ever touch {t} again!", "I hate this, {p} never listens!",
            "Get out, I'm sick of your excuses!", "That's unacceptable, fix {t} now!",
            "You broke {t}, you idiot!", "I'm so angry I could scream at {p}!"],
    "sad": ["I miss {p} so much, it hurts.", "I lost {t} and I feel so empty.",
            "Nobody came, I'm so lonely tonight.", "It's over, {t} is gone forever.",
            "I'm sorry, I just feel so hopeless.", "{p} left and I cried all night.",
            "I'm so tired and sad about {t}.", "Everything went wrong with {t}, I give up.",
            "I wish {p} were still here with me.", "It breaks my heart to lose {t}."],
}
AMBIGUOUS_LONG = ["I can't believe what happened with {t}.", "So {p} finally told me about {t}.",
                  "Well, that's {p} for you.", "I really didn't expect that from {p}.",
                  "You want to know about {t}? Fine.", "Oh, it's {t} again, of course.",
                  "That was quite a day, wasn't it?", "I need to tell you something about {t}."]

# Short templates (about 1 s) for the tiny test corpus.
SHORT = {
    "neu": ["It is Monday.", "The door is open.", "Take the bus.", "It's on the table.", "See you at nine."],
    "hap": ["I love it!", "How wonderful!", "Great news!", "I'm so happy!", "That's amazing!"],
    "ang": ["Stop it now!", "I hate this!", "Get out!", "How dare you!", "That's outrageous!"],
    "sad": ["I miss her.", "I feel so lonely.", "It's all gone.", "I'm so sorry.", "Nobody came."],
}
AMBIGUOUS_SHORT = ["Really?", "Oh, it's you.", "I see.", "Well, well.", "Not again."]


def choose_text(rng: np.random.Generator, label: str, short: bool, p_ambiguous: float,
                p_neutral: float) -> tuple[str, str]:
    """A transcript for ``label``: (text, kind) with kind 'emotional' | 'neutral' | 'ambiguous'.

    An emotional utterance gets an ambiguous sentence with probability ``p_ambiguous`` and a neutral
    one with ``p_neutral``; a neutral utterance gets an ambiguous sentence with ``p_ambiguous``."""
    bank, amb = (SHORT, AMBIGUOUS_SHORT) if short else (LONG, AMBIGUOUS_LONG)
    u = rng.random()
    if u < p_ambiguous:
        kind, pool = "ambiguous", amb
    elif label != "neu" and u < p_ambiguous + p_neutral:
        kind, pool = "neutral", bank["neu"]
    else:
        kind, pool = ("neutral" if label == "neu" else "emotional"), bank[label]
    template = pool[rng.integers(len(pool))]
    text = template.format(t=THINGS[rng.integers(len(THINGS))], p=PEOPLE[rng.integers(len(PEOPLE))])
    return text[0].upper() + text[1:], kind
