"""The decision a reasoning text implies, for the `roam` reward (AnomalyR1's consistency check).

A small keyword detector, on purpose: the reward must be cheap and predictable. Rules:

- Cues are matched case-insensitively at word starts. Normal cues: "no defect(s)", "no visible /
  obvious defect", "no anomaly/anomalies", "no damage", "defect-free", "without (any) defect(s) /
  anomalies", "nothing abnormal", "not anomalous / defective / damaged", "normal", "intact",
  "flawless". Anomalous cues: "abnormal...", "anomal..." (anomaly, anomalous), "defect..."
  (defect, defective), "damage..." (damage, damaged).
  Negated phrases are matched first, so "no defect" is normal, not a "defect"; "abnormal" is
  anomalous, not "normal".
- An explicit letter, "answer is a", "answer: (b)", "option a", "choice b", counts as a cue too.
- The LAST cue in the text decides: reasoning usually ends with its conclusion ("a scratch?
  no, it is normal"). No cue: no decision (None).

Returns the answer letter the decision corresponds to: "a" anomalous, "b" normal.
"""

from __future__ import annotations

import re

_NORMAL_CUES = (
    r"no\s+(?:visible\s+|obvious\s+|apparent\s+)?(?:defects?|anomal(?:y|ies)|damage)\b",
    r"defect[-\s]free",
    r"without\s+(?:any\s+)?(?:defects?|anomal(?:y|ies)|damage)\b",
    r"nothing\s+abnormal",
    r"not\s+(?:anomalous|defective|damaged|abnormal)\b",
    r"normal\b",
    r"intact\b",
    r"flawless\b",
)
_ANOMALOUS_CUES = (r"abnormal\w*", r"anomal\w*", r"defect\w*", r"damage\w*")
_LETTER_CUE = r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?\s*(?P<letter>[ab])\b"

_CUE = re.compile(
    r"\b(?:"
    + f"{_LETTER_CUE}|(?P<normal>{'|'.join(_NORMAL_CUES)})|(?P<anomalous>{'|'.join(_ANOMALOUS_CUES)})"
    + ")",
    re.IGNORECASE,
)


def reasoning_decision(text: str | None) -> str | None:
    """The letter the reasoning decides for ("a" anomalous, "b" normal) or None; see the module doc."""
    if not text:
        return None
    decision = None
    for match in _CUE.finditer(text):
        if match.group("letter"):
            decision = match.group("letter").lower()
        elif match.group("normal"):
            decision = "b"
        else:
            decision = "a"
    return decision
