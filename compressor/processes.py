"""The processes of one launch: `accelerate launch` (torchrun, DeepSpeed, mpirun) starts the same
`compress` command once per process.

Every process loads the model and runs every stage (a training stage then runs data parallel and
keeps the copies identical); only the main process writes to disk: the work folder, stage
checkpoints, the distillation's artifacts and the output. accelerate's `PartialState` knows the
process index and count (one process when nothing launched it) and sets up the process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Processes:
    index: int
    count: int
    _barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Block until every process reaches this point (nothing to wait for alone)."""
        if self.count > 1:
            self._barrier()


def launch_processes(device: torch.device) -> Processes:
    from accelerate import PartialState

    # `cpu` must agree with the Accelerator a training stage creates later (the state is shared).
    state = PartialState(cpu=device.type == "cpu")
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone)
