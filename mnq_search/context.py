"""The typed run: what a run is asked to do (:class:`RunSettings`, validated once where the values
enter: the CLI or a study spec) and what it works on (:class:`RunContext`, built once by the pipeline
and handed to strategies and objectives).

Nothing here imports torch at module level, so the CLI can build and check settings (and answer a
bad flag) before the heavy imports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .budget import LAYER_BITS, valid_layer_bits
from .errors import UsageError
from .runtime import EVAL_BATCH

if TYPE_CHECKING:
    import torch

    from .convert import QuantModel
    from .data import DataSource
    from .models import ModelInfo
    from .qat import QATConfig
    from .search import SearchOptions
    from .space import SearchSpace

ASQNR_FORMS = ("amplitude", "eq10")
POST_LN_MODES = ("tensor", "channel")  # --post-ln
IMPORTANCES = ("none", "lrp", "hessian")  # mixqvit: what weighs each layer's bit sensitivity


@dataclass
class RunSettings:
    """Everything ``mnq-search run`` is asked to do (the CLI's flags, or one cell of a study).

    ``qat`` holds the QAT settings of ``--qat-epochs`` and of the ``qat`` objective (None: the
    defaults of :class:`mnq_search.qat.QATConfig`); ``search`` the joint-search options (only with
    ``--strategy optuna``). :meth:`validate` checks every value once; the layers below trust them.
    """

    strategy: str = "sqnr_output"  # the best rule of the study that needs no validation images (README)
    model: str | None = None
    checkpoint: str | None = None
    num_classes: int | None = None  # None: the checkpoint's classifier decides
    data: str | None = None
    download: bool = False
    bits: int = 8
    nl_bits: int | None = None  # the non-linear slots' bit-width (None: bits)
    fine_grid: bool = False
    post_ln: str = "tensor"  # post-LayerNorm inputs: per tensor, or clipped channel-wise folded (reparam.py)
    val_size: int = 1000  # validation images the validation-scored strategies and objectives use
    families: tuple[str, ...] | None = None  # the method families offered to every slot (None: all registered)
    calib_size: int = 128
    eval_size: int | None = 2000  # None: the whole evaluation split
    batch_size: int = EVAL_BATCH
    sens_batch_size: int = 32
    asqnr_form: str = "amplitude"
    sensitivity: bool = False  # measure the sensitivity table even when the strategy does not need it
    sensitivity_cache: str | None = None  # read if it exists, else measure and write (studies share one)
    qat_epochs: int = 0  # > 0: QAT after the assignment is chosen
    qat: QATConfig | None = None
    search: SearchOptions | None = None
    seed: int = 0
    device: str | None = None
    out: str = "runs/default"
    progress: bool = True
    record_images: bool = False  # studies: per-image test correctness (correct.npz) and the validation top-1
    val_eval_size: int | None = None  # validation images of that top-1 (None: the whole validation split)
    groups: str = "1"  # input quantizers of the block linears and probabilities (mnq_search.groups.parse_groups)
    budget: str | None = None  # mixqvit: BOPs budget, "w6a6" or a count like "1.2G"
    search_bits: tuple = ((4, 4), (5, 5), (6, 6), (8, 8))  # mixqvit, --joint-bits: candidate (weight, activation) bits
    importance: str = "none"  # mixqvit: layer importance, one of IMPORTANCES
    bit_sensitivity_cache: str | None = None  # mixqvit: the bit-sensitivity table, read if it exists, else written
    joint_bits: bool = False  # a bit-width per weight layer in the search space (optuna, random)
    joint_groups: bool = False  # a group count per group layer in the search space (optuna, random)
    search_groups: tuple = (1, 2, 4, 8, 16)  # --joint-groups: candidate group counts (mnq_search.groups.CANDIDATES)
    joint_nl_bits: bool = False  # a bit-width per Softmax and GELU slot in the search space (optuna, random)
    search_nl_bits: tuple = (6, 8)  # --joint-nl-bits: candidate slot bit-widths

    def validate(self) -> "RunSettings":
        """Raise a one-line UsageError for the first bad value; returns self."""
        from strategies import get_strategy

        from .integer import check_bits

        get_strategy(self.strategy)
        for flag, value in (("--bits", self.bits), ("--nl-bits", self.nl_bits)):
            try:
                if value is not None or flag == "--bits":
                    check_bits(value)
            except ValueError as exc:
                raise UsageError(f"{flag}: {exc}") from None
        for flag, value, low in (("--calib-size", self.calib_size, 1), ("--batch-size", self.batch_size, 1),
                                 ("--val-size", self.val_size, 1),
                                 ("--sens-batch-size", self.sens_batch_size, 1), ("--qat-epochs", self.qat_epochs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UsageError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.eval_size is not None and (not isinstance(self.eval_size, int) or self.eval_size <= 0):
            raise UsageError(f"--eval-size must be positive or 'all', got {self.eval_size!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise UsageError(f"--num-classes must be a positive integer, got {self.num_classes!r}")
        if self.families is not None:
            from .methods import get_family

            self.families = tuple(self.families)
            for f in self.families:
                get_family(f)
        from .groups import parse_groups

        self.groups = str(parse_groups(self.groups))
        if self.post_ln not in POST_LN_MODES:
            raise UsageError(f"--post-ln: choose from {', '.join(POST_LN_MODES)} (got {self.post_ln!r})")
        if self.asqnr_form not in ASQNR_FORMS:
            raise UsageError(f"unknown ASQNR form {self.asqnr_form!r}; choose from: {', '.join(ASQNR_FORMS)}")
        is_optuna = self.strategy.partition(":")[0] == "optuna"
        if self.search is not None and not is_optuna:
            raise UsageError("search options (--objective, --n-trials, ...) apply only to --strategy optuna")
        if is_optuna:
            from .search import SearchOptions

            self.search = (self.search or SearchOptions()).validate()
        if self.qat is not None:
            self.qat.validate()
        self._validate_mixqvit()
        return self

    def _validate_mixqvit(self) -> None:
        from .budget import parse_budget_spec

        if self.budget is not None:
            try:
                parse_budget_spec(self.budget)
            except UsageError as e:
                raise UsageError(f"--budget: {e}") from None
        is_mixqvit = self.strategy.partition(":")[0] == "mixqvit"
        bops_search = self.strategy.partition(":")[0] == "optuna" and (self.joint_bits or self.joint_groups
                                                                        or self.joint_nl_bits)
        if self.budget is not None and not (is_mixqvit or bops_search):
            raise UsageError("--budget applies only to --strategy mixqvit, or optuna with --joint-bits, --joint-nl-bits "
                             "or --joint-groups (a constraint on every trial)")
        if self.budget is not None and parse_budget_spec(self.budget).groups and not self.joint_groups:
            raise UsageError(f"--budget {self.budget}: a group budget (gG) needs --joint-groups")
        if is_mixqvit and self.budget is None:
            raise UsageError("--strategy mixqvit needs --budget (e.g. w6a6)")
        if self.bit_sensitivity_cache and not is_mixqvit:
            raise UsageError("--bit-sensitivity-cache applies only to --strategy mixqvit")
        if self.importance not in IMPORTANCES:
            raise UsageError(f"--importance: choose from {', '.join(IMPORTANCES)} (got {self.importance!r})")
        for flag, on in (("--joint-bits", self.joint_bits), ("--joint-groups", self.joint_groups),
                         ("--joint-nl-bits", self.joint_nl_bits)):
            if on and self.strategy.partition(":")[0] not in ("optuna", "random"):
                raise UsageError(f"{flag} applies to --strategy optuna or random (mixqvit allocates bits itself)")
        if self.joint_groups and self.groups != "1":
            raise UsageError(f"--joint-groups searches the group counts: leave --groups at 1 (got {self.groups})")
        counts = tuple(self.search_groups)
        if not counts or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in counts):
            raise UsageError(f"--search-groups: group counts must be integers >= 1, got {self.search_groups!r}")
        self.search_groups = tuple(sorted(set(counts)))
        if isinstance(self.search_nl_bits, str):  # "6,8" (study specs, scripts)
            try:
                self.search_nl_bits = tuple(int(v) for v in self.search_nl_bits.split(","))
            except ValueError:
                raise UsageError(f"--search-nl-bits: expected comma-separated bit-widths like 6,8, "
                                 f"got {self.search_nl_bits!r}") from None
        nl = tuple(self.search_nl_bits)
        if not nl or any(isinstance(b, bool) or not isinstance(b, int) or not 4 <= b <= 8 for b in nl):
            raise UsageError(f"--search-nl-bits: bit-widths must be integers in 4..8, got {self.search_nl_bits!r}")
        self.search_nl_bits = tuple(sorted(set(nl)))
        from .budget import bits_pair, parse_search_bits

        if isinstance(self.search_bits, str):  # "4,6,8" or "w4a8,w6a6" (study specs, scripts)
            self.search_bits = parse_search_bits(self.search_bits)
        pairs = tuple(tuple(p) if isinstance(p, (tuple, list)) else (bits_pair(p) or (p, p)) for p in self.search_bits)
        if not pairs or any(len(p) != 2 or not all(valid_layer_bits(b) for b in p) for p in pairs):
            raise UsageError(f"--search-bits: bit-widths must be in {LAYER_BITS[0]}..{LAYER_BITS[1]}, got {self.search_bits!r}")
        self.search_bits = tuple(sorted(set(pairs)))

    def replace(self, **changes: Any) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        """The settings as plain JSON values (result.json's ``config``)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out


@dataclass
class RunContext:
    """What strategies and objectives work on: the settings, the model's slots and, once the
    pipeline has loaded them, the float model, the converted (uncalibrated) model, the data, the
    device, the search space and the sensitivity table (when the strategy asked for it).

    Strategies that need only the slots (``uniform``, ``random``, the greedy rules given a table)
    accept a context with ``slot_ops`` and ``sensitivity`` alone.
    """

    settings: RunSettings
    slot_ops: dict[str, str]
    model: torch.nn.Module | None = None
    qmodel: QuantModel | None = None
    data: DataSource | None = None
    device: str = "cpu"
    info: ModelInfo | None = None
    sensitivity: list[dict] | None = None
    space: SearchSpace | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # timings and the like, for result.json

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def bits(self) -> int:
        return self.settings.bits

    @property
    def nl_bits(self) -> int:
        return self.settings.nl_bits or self.settings.bits

    @property
    def search_space(self) -> SearchSpace:
        """The run's search space (method variables of ``slot_ops`` when none was built)."""
        if self.space is None:
            from .space import SearchSpace

            self.space = SearchSpace.of_slots(self.slot_ops, self.settings.families)
        return self.space

    @property
    def families(self) -> tuple[str, ...]:
        """The method families this run offers (``settings.families``, else every registered one)."""
        from .methods import list_families

        return tuple(f for f in list_families() if self.settings.families is None or f in self.settings.families)

    def _need(self, what: str) -> None:
        if getattr(self, what) is None:
            raise UsageError(f"this strategy or objective needs the run's {what}, which this context lacks")

    def calib_batches(self, n: int | None = None, batch_size: int | None = None):
        """The run's calibration images (the same for the final model and every trial)."""
        self._need("data")
        return self.data.calib_batches(n or self.settings.calib_size, batch_size or self.settings.batch_size)

    def validation_batches(self, n: int, batch_size: int | None = None):
        """``n`` images of the validation split (never trained on, never the test split)."""
        self._need("data")
        return self.data.validation_batches(n, batch_size or self.settings.batch_size)

    def calibrated(self, assignment: dict[str, str]) -> QuantModel:
        """A calibrated copy of the converted model with ``assignment``, on the run's calibration
        images (as the pipeline calibrates the final model)."""
        import copy

        from .calibrate import calibrate

        self._need("qmodel")
        model = copy.deepcopy(self.qmodel)
        model.set_quant(True)
        model.set_assignment(assignment)
        calibrate(model, self.calib_batches(), self.device)
        return model

    def qat_config(self, **changes: Any) -> QATConfig:
        """The run's QAT settings (defaults where none were given) with ``changes``."""
        from .qat import QATConfig

        base = self.settings.qat or QATConfig()
        return dataclasses.replace(base, **{"seed": self.seed, **changes})
