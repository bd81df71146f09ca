"""Word error rate, for tests that check transcriptions against the spoken text."""

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (inner apostrophes kept: "don't")."""
    return [w for w in (t.strip("'") for t in re.findall(r"[\w']+", text.lower())) if w]


def normalize(text: str) -> str:
    return " ".join(words(text))


def wer(reference: str, hypothesis: str) -> float:
    """Word-level edit distance divided by the number of reference words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))  # distances from the previous reference prefix
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1] / max(len(ref), 1)
