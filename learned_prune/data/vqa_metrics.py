"""Official answer normalisation and metrics of GQA, POPE, ScienceQA-IMG and TextVQA.

Each rule follows the evaluation code the LLaVA-1.5 paper reports with (the rule's source is
named in its docstring), so numbers from ``python eval.py data=vqa`` are comparable with the
papers' tables. :class:`BenchmarkAccuracy` wraps them as a torchmetrics ``Metric`` with the same
interface as :class:`~learned_prune.evaluation.vqa.AnswerAccuracy`; a data module hands it to the
evaluation through its ``metric()``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

BENCHMARKS = ("gqa", "pope", "scienceqa", "textvqa")

# ---- VQA / TextVQA (the VQA challenge's EvalAI evaluation code) -------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# apostrophe-less spellings mapped back to the contraction (the official table's common entries)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's",
    "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer processing: whitespace, punctuation (kept inside numbers such as
    ``1,000`` and ``2.5``), number words to digits, articles dropped, contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, gold_answers: Sequence[str]) -> float:
    """VQA accuracy: for each of the (10) human answers, ``min(1, #other humans who gave the
    prediction / 3)``, averaged over the leave-one-out subsets (the official definition)."""
    if not gold_answers:
        raise ValueError("vqa_accuracy needs the human answers of the question")
    pred = vqa_normalize(prediction)
    golds = [vqa_normalize(g) for g in gold_answers]
    scores = []
    for i in range(len(golds)):
        matches = sum(g == pred for j, g in enumerate(golds) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---- GQA (LLaVA's convert_gqa_for_eval + GQA's exact-match accuracy) -------------------------
def gqa_normalize(text: str) -> str:
    """LLaVA's GQA processing: strip, drop a trailing period, lowercase."""
    return text.strip().rstrip(".").lower()


def gqa_correct(prediction: str, answer: str) -> bool:
    return gqa_normalize(prediction) == gqa_normalize(answer)


# ---- POPE (LLaVA's eval_pope.py) --------------------------------------------------------------
def pope_answer(text: str) -> str:
    """'no' if the first sentence has the word 'no'/'No'/'not' (commas dropped), else 'yes'."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class = 'yes') and the ratio of 'yes' answers."""
    pred = [pope_answer(p) == "yes" for p in predictions]
    gold = [lab.strip().lower() == "yes" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = max(len(pred), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"acc": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": sum(pred) / n}


# ---- ScienceQA (LLaVA's eval_science_qa.py) ----------------------------------------------------
_THE_ANSWER = re.compile(r"The answer is ([A-Z])\.")


def scienceqa_letter(prediction: str, n_options: int) -> str | None:
    """The option letter of a prediction: the bare letter, ``"B. ..."``, or ``"The answer is B."``;
    None when none parses (counted wrong, as LLaVA's script does)."""
    options = [chr(ord("A") + i) for i in range(n_options)]
    text = prediction.strip()
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    if len(text) == 2 and text[0] in options and text[1] in ".):":
        return text[0]
    found = _THE_ANSWER.findall(text)
    return found[0] if found and found[0] in options else None


def scienceqa_correct(prediction: str, answer: str, n_options: int) -> bool:
    return scienceqa_letter(prediction, n_options) == answer.strip()


# ---- one metric object for the eval grid -------------------------------------------------------
class BenchmarkAccuracy(Metric):
    """Per-benchmark accuracy, overall and per question type (``acc``, ``acc_<type>``); POPE adds
    ``precision``, ``recall``, ``f1`` and ``yes_ratio``.

    ``update(predictions, golds, qtypes)``: ``golds`` holds, per question, the gold answer string or
    (TextVQA) the list of human answers; for ScienceQA the gold is ``"<letter>|<n_options>"``.
    """

    full_state_update = False

    def __init__(self, benchmark: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {benchmark!r}; choose from {BENCHMARKS}")
        self.benchmark = benchmark
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("pope", default=[], dist_reduce_fx="cat")  # (pred yes, gold yes) pairs
        self.qtypes: list[str] = []

    def _score(self, prediction: str, gold: Any) -> float:
        if self.benchmark == "textvqa":
            return vqa_accuracy(prediction, list(gold) if not isinstance(gold, str) else [gold])
        if self.benchmark == "gqa":
            return float(gqa_correct(prediction, gold))
        if self.benchmark == "pope":
            if gold.strip().lower() not in ("yes", "no"):
                raise ValueError(f"POPE label {gold!r} is not yes/no: POPE scores yes/no answers, so any other "
                                 "label would score 0 for every prediction; fix the label in the annotations")
            return float(pope_answer(prediction) == gold.strip().lower())
        letter, n = gold.split("|")
        return float(scienceqa_correct(prediction, letter, int(n)))

    def update(self, predictions: Sequence[str], golds: Sequence[Any], qtypes: Sequence[str] | None = None) -> None:
        qtypes = list(qtypes) if qtypes is not None else [self.benchmark] * len(predictions)
        for p, g, q in zip(predictions, golds, qtypes):
            self.scores.append(torch.tensor([self._score(p, g)]))
            self.qtypes.append(q or self.benchmark)
            if self.benchmark == "pope":
                self.pope.append(torch.tensor([[pope_answer(p) == "yes", g.strip().lower() == "yes"]]))

    def compute(self) -> torch.Tensor:
        if not self.scores:
            return torch.tensor(0.0)
        return torch.cat(self.scores).mean()

    def compute_all(self) -> dict[str, torch.Tensor]:
        out = {"acc": self.compute()}
        if not self.scores:
            return out
        scores = torch.cat(self.scores)
        for q in sorted(set(self.qtypes)):
            rows = torch.tensor([t == q for t in self.qtypes])
            out[f"acc_{q}"] = scores[rows].mean()
        if self.benchmark == "pope" and self.pope:
            pairs = torch.cat(self.pope)
            preds = ["yes" if p else "no" for p in pairs[:, 0].tolist()]
            golds = ["yes" if g else "no" for g in pairs[:, 1].tolist()]
            for k, v in pope_metrics(preds, golds).items():
                if k != "acc":
                    out[k] = torch.tensor(v)
        return out

    def reset(self) -> None:
        super().reset()
        self.qtypes = []
