"""Prose that cannot drift: every number a reader sees in text is one the course measured.

A sentence such as "BN costs 1.36x per step" goes stale the moment the notebook is re-run
and the measurement moves. This module finds the numbers in what a learner reads (every
markdown cell of every notebook, and the README's hand-written prose) and checks each one:

- a decimal number with a decimal point (``0.138``), and
- a ratio written ``N×`` or ``Nx`` (``5×``, ``1.36x``),
- an interval of a difference written ``d [lo, hi]`` (``0.108 [0.056, 0.159]``, ``50 [32, 67]``
  steps), checked as one phrase: its three numbers must appear together, so an interval of
  step counts, or one whose every number happens to occur elsewhere, cannot go stale,

must appear in that notebook's stored outputs, or in the results store, at the precision
the prose prints it (``0.138`` matches an output ``0.138`` or a stored value 0.13834), or
be listed in :data:`CONSTANTS` with its reason (a book's or paper's figure, a
hyperparameter, a definition). Identifiers are not numbers here: arXiv ids, section and
figure numbers, versions, dates, links and inline code are skipped.

``python -m bnlab.teaching.prose`` lists what fails; ``tests/teaching/test_prose.py``
asserts that nothing does.

Serves every notebook and the README (`make test`).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bnlab.teaching import results
from bnlab.teaching.notebooks import course_notebooks, output_texts

# Numbers that are not measurements: the figure, and why it may stand in prose.
CONSTANTS: dict[str, str] = {
    "0.1": "PyTorch's default BN momentum; d2l v1.0's learning rate; chance accuracy on 10 classes",
    "0.2": "a stated threshold or learning rate (the prose names which)",
    "0.4": "the course's 'trained' threshold: four times chance on 10 classes",
    "0.5": "a stated constant: Dropout's rate, the sigmoid's value at 0, a shift in an example",
    "0.7": "the target accuracy of notebook 08's speed claim",
    "0.9": "d2l's LeNet learning rate (zh.d2l.ai §6.6); Keras' and zh.d2l.ai's momentum",
    "0.99": "Keras' default BN momentum (keras.layers.BatchNormalization)",
    "0.01": "a stated learning rate or PyTorch momentum converted from Keras' 0.99",
    "0.05": "a stated learning-rate base (notebook 06's rule: 0.05 per 16 images)",
    "1.0": "d2l's BN LeNet learning rate (zh.d2l.ai §7.5)",
    "1.96": "the standard normal's 97.5 % quantile",
    "0.975": "the quantile of a two-sided 95 % interval",
    "0.809": "d2l-en before v1.0: LeNet's printed test accuracy (one run)",
    "0.838": "d2l-en before v1.0: BN LeNet's printed test accuracy (one run)",
    "0.73": "d2l.ai v1.0, section 8.5: plain LeNet's final accuracy",
    "0.87": "d2l.ai v1.0, section 8.5: BN LeNet's final accuracy",
    "0.10": "d2l.ai v1.0, section 8.5: plain LeNet's accuracy during its plateau",
    "0.018": "the sigmoid's slope at |z| = 4, sigma(4)(1 - sigma(4))",
    "1.2": "float32's smallest normal number, 1.2e-38 (IEEE 754); PyTorch PR #47657's unfused time",
    "3.7": "PyTorch PR #47657's measured time of its fused ResNet-18 (cited in notebook 07)",
    "6.1e-5": "float16's smallest normal number (IEEE 754)",
    "0.286": "Fashion-MNIST's mean pixel value (Xiao et al. 2017)",
    "76.13": "torchvision's ResNet-50 IMAGENET1K_V1 top-1 accuracy (its model card)",
    "4×": "Xavier x 4: Bengio (2012)'s correction of Glorot's init for the sigmoid's slope 1/4",
}

NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+(?:e[-+]?\d+)?)(?![\w.]*\d)")
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?[×x](?![\w])")
INTERVAL = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)? \[-?\d+(?:\.\d+)?, -?\d+(?:\.\d+)?\]")
SKIP = [
    re.compile(r"`[^`]*`"),  # inline code: identifiers and calls, not prose
    re.compile(r"```.*?```", re.S),  # code blocks
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),
    re.compile(r"arXiv:\s?\d{4}\.\d{4,5}(v\d+)?", re.I),
    # section, figure, table, equation, chapter and volume numbers, in English and Chinese
    re.compile(
        r"(?:§|\b(?:Sec|Secs|Section|Sections|section|sections|Fig|Figure|figure|Table|table|"
        r"Eq|Equation|Chapter|chapter|Algorithm|Appendix|Definition|Theorem|Lemma|vol|Vol)\.?\s*)"
        r"\d+(?:\.\d+)*(?:\s*(?:,|and|&|to|–|-)\s*\d+(?:\.\d+)*)*"
    ),
    re.compile(r"\d+(?:\.\d+)+\s*(?:节|章)"),
    re.compile(r"「\s*\d+(?:\.\d+)*"),  # a post's own section number, quoted with its title
    # versions: v1.0, torch 2.14.1, Python 3.11, d2l classic (0.17), a.b.c
    re.compile(r"\bv\d+(?:\.\d+)+"),
    re.compile(r"\b\d+\.\d+\.\d+\b"),
    re.compile(
        r"\b(?:torch|Python|PyTorch|numba|numba-cuda|torchvision|CUDA|Chromium|JupyterLab|"
        r"scipy|SciPy|nbval|Sphinx|classic)\s*\(?\d+(?:\.\d+)+\)?"
    ),
    re.compile(r"\d{4}-\d{2}-\d{2}"),  # dates
]


@dataclass(frozen=True)
class Finding:
    """A number in prose that no output, stored figure or constant accounts for."""

    where: str
    number: str
    context: str

    def __str__(self) -> str:
        return f"{self.where}: {self.number!r} in ...{self.context}..."


def numbers_in(text: str) -> list[tuple[str, int]]:
    """The checked numbers of a prose text, with their positions: intervals, ratios, decimals."""
    for pattern in SKIP:
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    intervals = [(m.group(0), m.start()) for m in INTERVAL.finditer(text)]
    text = INTERVAL.sub(lambda m: " " * len(m.group(0)), text)  # checked whole, once
    ratios = [(m.group(1) + "×", m.start()) for m in RATIO.finditer(text)]
    text = RATIO.sub(lambda m: " " * len(m.group(0)), text)  # a ratio's number counts once
    found = [(m.group(1), m.start()) for m in NUMBER.finditer(text)]
    return sorted(found + ratios + intervals, key=lambda item: item[1])


def _floats(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _floats(v)]
    return []


class Evidence:
    """Where a number may come from: output texts, the store's texts and its values."""

    def __init__(self, texts: list[str], values: list[float]) -> None:
        self.text = "\n".join(texts)
        self.values = values

    def accounts_for(self, number: str) -> bool:
        if "[" in number:  # an interval: the phrase itself, as printed or stored
            return re.search(rf"(?<![\d.]){re.escape(number.lstrip('+'))}", self.text) is not None
        plain = number.rstrip("×")
        if plain in CONSTANTS or number in CONSTANTS:
            return True
        if re.search(rf"(?<![\d.]){re.escape(plain)}(?!\d)", self.text):
            return True
        digits = len(plain.split(".")[1]) if "." in plain else 0
        target = float(plain)
        return any(round(v, digits) == target for v in self.values)


def _output_texts(nb: dict) -> list[str]:
    return [t for cell in nb["cells"] for o in cell.get("outputs", []) for t in output_texts(o)]


def store_evidence(store: dict | None = None) -> Evidence:
    figures = (store or results.load())["figures"]
    texts = [f["text"] for f in figures.values()]
    values = [v for f in figures.values() for v in _floats(f["value"])]
    return Evidence(texts, values)


def _context(text: str, at: int) -> str:
    return " ".join(text[max(0, at - 40) : at + 40].split())


def notebook_findings(path: Path, store: Evidence) -> list[Finding]:
    """The numbers in a notebook's markdown that nothing accounts for."""
    nb = json.loads(path.read_text())
    own = Evidence(_output_texts(nb), [])
    found = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        for number, at in numbers_in(text):
            if not (own.accounts_for(number) or store.accounts_for(number)):
                found.append(Finding(f"{path.stem} cell {index}", number, _context(text, at)))
    return found


def readme_prose(text: str) -> str:
    """The README without the blocks generated from the store (``results.BLOCKS``)."""
    for block in results.BLOCKS:
        text = re.sub(rf"<!-- {block} -->\n.*?<!-- /{block} -->", "", text, flags=re.S)
    return text


def readme_findings(path: Path = results.README, store: Evidence | None = None) -> list[Finding]:
    """The numbers in the README's hand-written prose that nothing accounts for."""
    store = store or store_evidence()
    text = readme_prose(path.read_text())
    return [
        Finding("README.md", number, _context(text, at))
        for number, at in numbers_in(text)
        if not store.accounts_for(number)
    ]


def findings() -> list[Finding]:
    """Every unaccounted number in the course's notebooks and the README."""
    store = store_evidence()
    found = [f for path in course_notebooks() for f in notebook_findings(path, store)]
    return found + readme_findings(store=store)


def main() -> int:
    found = findings()
    for finding in found:
        print(finding)
    print(f"{len(found)} number(s) in prose without a measurement or a listed constant")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
