"""Preemption: Cloud TPU's notice (SIGTERM) stops a stage at a step every host agrees on.

A spot or preemptible TPU VM gets SIGTERM shortly before it is taken away.
Long stages (finetune's steps, the data stage's batches) ask `reached(step)`
after each unit of work; once the notice has come it answers True, at the
same step on every host, so that every host saves that step together (a
checkpoint's shards come from every host) and then stops with
`Preempted`, which ends the process with PREEMPTED_EXIT_CODE. Rerunning
the stage resumes from what was saved.

On a pod the agreement is JAX's preemption sync point (the coordination
service learns of the notice from whichever host got it and picks the
next step as the one to stop at); `jax.distributed.initialize` already
catches SIGTERM for it. In one process, `watching()` catches SIGTERM
itself while the work runs, and puts the previous handler back after.

Example:
```python
with watching() as notice:
    for step, batch in enumerate(batches, start=1):
        train_on(batch)
        if notice.reached(step):
            save(step)
            raise Preempted(f"finetune: preempted at step {step}; rerun to resume")
```
"""

import contextlib
import signal

# EX_TEMPFAIL (sysexits.h): a temporary failure, run the same command again.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """The stage saved what it had and stopped at a preemption notice."""


class PreemptionNotice:
    """Whether a preemption notice has come, agreed on by every host."""

    def __init__(self):
        self.noticed = False  # one process: set by the SIGTERM handler

    def reached(self, step):
        """True once a notice has come, at the same `step` on every host.
        Every host calls it after every unit of work, with increasing steps."""
        import jax

        if jax.distributed.is_initialized():
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.noticed


@contextlib.contextmanager
def watching():
    """A PreemptionNotice for the work inside the block. One process: SIGTERM
    sets it (rather than ending the process) until the block ends."""
    import jax

    notice = PreemptionNotice()
    if jax.distributed.is_initialized():
        yield notice
        return

    def note(signum, frame):
        notice.noticed = True

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield notice
    finally:
        signal.signal(signal.SIGTERM, previous)
