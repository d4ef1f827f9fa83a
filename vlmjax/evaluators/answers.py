"""VQA answer normalisation, after the VQAv2 evaluation (Antol et al. 2015; Goyal et al.
2017): answers compare equal when they match after lower-casing, removing punctuation
(keeping the decimal point of numbers and apostrophes inside words), turning number words
into digits, dropping articles and common contractions' missing apostrophes, and
collapsing white space. "Two dogs." == "2 dogs"; "The red one" == "red 1"."""

from __future__ import annotations

import re

NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings VQAv2 maps back (a few of its list: the common ones).
CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
    "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't",
    "hasnt": "hasn't", "havent": "haven't", "couldnt": "couldn't", "shouldnt": "shouldn't",
    "wouldnt": "wouldn't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
    "whats": "what's", "its": "it's", "theyre": "they're", "lets": "let's",
}  # fmt: skip
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PUNCTUATION = re.compile(r"[^\w\s'.]|_")


def normalise_answer(text: str) -> str:
    """The VQAv2 normal form of an answer (see the module doc)."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _COMMA_IN_NUMBER.sub("", text)  # 1,000 -> 1000
    text = _DECIMAL.sub("DECIMALPOINT", text)  # upper case: no lower-cased word has it
    text = _PUNCTUATION.sub(" ", text).replace(".", " ").replace("DECIMALPOINT", ".")
    words = []
    for word in text.split():
        word = word.strip("'")  # quotes, not apostrophes inside a word
        word = NUMBERS.get(word, word)
        if word and word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)
