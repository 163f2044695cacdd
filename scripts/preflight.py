"""Preflight: can this machine read the preset and the encoder and write the run?

See pipeline/run/preflight.py; `scripts/tpu_pod.py setup` runs it on worker 0.
"""

import _cli

if __name__ == "__main__":
    _cli.main(__doc__, "pipeline.run.preflight", "check_ready")
