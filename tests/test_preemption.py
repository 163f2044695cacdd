"""The preemption notice in one process: SIGTERM while a stage trains or
generates is noted (the stage saves and exits 75), outside it ends the
process as usual."""

import os
import signal

from pipeline.parallel.preemption import watching


def test_sigterm_inside_the_block_is_a_notice_and_outside_it_is_not_caught():
    before = signal.getsignal(signal.SIGTERM)
    with watching() as notice:
        assert not notice.reached(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.reached(1)
    assert signal.getsignal(signal.SIGTERM) is before
