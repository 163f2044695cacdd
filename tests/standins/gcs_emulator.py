"""The tests' GCS: gcp-storage-emulator, in memory, on loopback.

    python tests/standins/gcs_emulator.py PORT BUCKET

Run as the package runs it, with one change: the emulator writes the
metadata of every object in the store, as one JSON document, after every
upload and delete, so that a store on disk can be reopened. In memory
nothing reads it again, and with a checkpoint's hundreds of objects that
rewrite made each save slower than the last (from seconds to minutes); it
is skipped. The HTTP API the clients see is the package's own.
"""

import sys

from gcp_storage_emulator import server, storage

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    storage.Storage._write_config_to_file = lambda self: None
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
