"""Results of a run: the folder (``writer``), its numbers (``metrics``), Chrome trace (``trace``), plots
(``plots``), W&B logging (``wandb_log``), comparison of runs (``compare``) and the terminal progress line
(``progress``). Heavy imports (matplotlib, wandb) stay inside the modules that need them."""

from .metrics import WorkerStats, outputs_sha256, summarize
from .progress import Progress
from .writer import load_events, load_records, load_summary, write_config, write_results

__all__ = ["WorkerStats", "outputs_sha256", "summarize", "Progress", "load_events", "load_records",
           "load_summary", "write_config", "write_results"]
