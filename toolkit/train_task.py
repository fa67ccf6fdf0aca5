"""The trainer as a submitit task (launchers/submit.py submits it through submitit's
SlurmExecutor). Its own module, not toolkit.slurm's: the trainer imports toolkit.slurm (to
requeue after USR2), so the task that starts the trainer cannot live there without a cycle."""

import logging
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainTask:
    """One submitit task: what `python -m toolkit.train RECIPE --set ...` does, in this process.

    In-process rather than submitit's CommandFunction, whose child process would get Slurm's
    signals while submitit's handlers in the parent requeued the job too (or raised, killing the
    child mid-checkpoint). Not submitit's Checkpointable either: its checkpoint() runs in rank 0's
    signal handler alone, and our checkpoints are written by every rank at one step boundary. So
    the trainer's handlers replace submitit's, and only `slurm.requeue_after_signal` requeues.
    """

    recipe: str
    overrides: tuple[str, ...]

    def __call__(self) -> None:
        # Until the trainer installs its handlers (after importing torch), the defaults: a signal
        # then ends the task, with nothing to save yet, instead of submitit requeueing by itself.
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        from toolkit.train import run  # torch: only on the compute nodes

        logging.getLogger("submitit").propagate = False  # it has its own handlers: log once

        status = run(self.recipe, list(self.overrides))
        if status:
            raise RuntimeError(f"training exited with status {status}; the log above says why")
