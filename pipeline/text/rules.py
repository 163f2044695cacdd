"""Rule-based rewrites for the offline demo.

The tiny demo model cannot follow instructions, so the demo's data stage
rewrites texts with these deterministic rules instead: each prompt leaves a
visible trace in the rewrite, which gives the recovery task a learnable
signal. `demo/prompts.txt` lists exactly these prompts.

Example:
```python
rewrite("Convert this text into all capital letters.", "A cat sat.")
# 'A CAT SAT.'
```
"""

import re

from pipeline.errors import InputError


def _sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _pirate(text):
    swaps = {"you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be", "the": "th'"}
    words = [swaps.get(w.lower(), w) for w in text.split()]
    return "Arr, " + " ".join(words) + " Yo ho ho!"


RULES = {
    "Convert this text into all capital letters.": str.upper,
    "Rewrite the text in lowercase without any punctuation.": lambda t: re.sub(
        r"[^\w\s]", "", t.lower()
    ),
    "Reverse the order of the sentences in this text.": lambda t: " ".join(reversed(_sentences(t))),
    "Turn this text into a bulleted list.": lambda t: "\n".join("* " + s for s in _sentences(t)),
    "Make this text into a numbered list of steps.": lambda t: "\n".join(
        f"{i}. {s}" for i, s in enumerate(_sentences(t), 1)
    ),
    "Rewrite this text as a pirate would say it.": _pirate,
    "Summarize this text in one short sentence.": lambda t: _sentences(t)[0],
    "Rewrite this text as a formal letter.": lambda t: (
        "Dear Sir or Madam,\n\n" + t + "\n\nYours faithfully,\nThe Writer"
    ),
    "Add a title to this text.": lambda t: (
        "Title: " + " ".join(t.split()[:4]).rstrip(".,") + "\n\n" + t
    ),
    "Make this text sound very excited.": lambda t: re.sub(r"\.", "!!", t) + " Wow!",
    "Rewrite this text as a short poem.": lambda t: "\n".join(
        " ".join(s.split()[:5]) for s in _sentences(t)[:4]
    ),
    "Rewrite this text as a news headline.": lambda t: (
        "BREAKING: " + " ".join(t.split()[:8]).title().rstrip(".,")
    ),
}


def rewrite(prompt, text):
    """Applies the rule registered for `prompt` to `text`."""
    try:
        rule = RULES[prompt]
    except KeyError:
        raise InputError(
            f"no rewrite rule for prompt {prompt!r}; with data.rewriter=rules the "
            "prompt pool may only hold the prompts in pipeline/text/rules.py"
        ) from None
    return rule(text)
