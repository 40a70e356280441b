"""Figures and tables of *Mixed Non-linear Quantization for Vision Transformers* (Kim et al.)
from this project's outputs: ``mnq-search report DIR``.

- Figure 1: per-slot SQNR diff (bars) and output ASQNR (lines) per method (``_sensitivity.py``);
- Figure 2: float vs quantized output histograms of chosen slots (``_histograms.py``);
- Figures 3 and 4: per-slot ASQNR after QAT and top-1 per QAT epoch per strategy (``_qat.py``);
- Optuna studies: history, slot importance, Pareto front (``_optuna.py``);
- Tables 3 and 4: methods per op and top-1 per strategy and bits (``_tables.py``);

all gathered in one self-contained ``index.html`` (``_html.py``) by :func:`make_report`.

>>> from mnq_search.report import make_report
>>> report = make_report("runs/default", histograms=False)   # doctest: +SKIP
>>> report.index                                              # doctest: +SKIP
PosixPath('runs/default/report/index.html')
"""

from ._histograms import pick_slots as pick_slots
from ._inputs import find_inputs as find_inputs
from ._report import DEFAULT_IMAGES as DEFAULT_IMAGES
from ._report import Report as Report
from ._report import make_report as make_report

__all__ = ["DEFAULT_IMAGES", "Report", "find_inputs", "make_report", "pick_slots"]
