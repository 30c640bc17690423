"""Any folder of class sub-folders becomes a task: ``data.task_options.imagefolder.data_dir=DIR``.

To have several folder tasks at once, copy this file and change the registered name.
"""

from typing import Optional

from moebsr.tasks import Task, register_task
from moebsr.tasks.builders import folder_task


@register_task("imagefolder")
def imagefolder(data_dir: Optional[str] = None, num_outputs: Optional[int] = None, test_fraction: float = 0.2,
                seed: int = 0) -> Task:
    return folder_task("imagefolder", data_dir, num_outputs=num_outputs, test_fraction=test_fraction, seed=seed,
                       metrics=["top1", "macro_f1"])
