"""The jobs behind the commands, one file each: ``run`` (:mod:`._run`), ``eval`` (:mod:`._eval`),
``qat`` (:mod:`._qat`); what they share: the checks before any work (:mod:`._preflight`), opening
the model and data as a run context (:mod:`._build`), the output files (:mod:`._outputs`) and the
device (:mod:`._device`); the checks that need no model are :mod:`mnq_search.preflight`."""

from ._build import open_run as open_run
from ._build import prepare as prepare
from ._device import default_device as default_device
from ._device import device_name as device_name
from ._eval import evaluate_assignment as evaluate_assignment
from ._outputs import SENSITIVITY_FIELDS as SENSITIVITY_FIELDS
from ._outputs import read_sensitivity_csv as read_sensitivity_csv
from ._outputs import sensitivity_csv as sensitivity_csv
from ..preflight import check_output_dir as check_output_dir
from ..preflight import check_storage as check_storage
from ._qat import qat_job as qat_job
from ._qat import write_qat_outputs as write_qat_outputs
from ._run import preflight_run as preflight_run
from ._run import run as run

__all__ = ["SENSITIVITY_FIELDS", "default_device", "device_name",
           "evaluate_assignment", "open_run", "preflight_run", "prepare", "qat_job", "read_sensitivity_csv", "run",
           "sensitivity_csv", "write_qat_outputs"]
