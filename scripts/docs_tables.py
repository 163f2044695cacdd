"""Writes the tables of docs/ that the code computes (the model table, every
config key, every config's memory and disk plans) into their pages.

No download, no device: the families' published architectures and configs/.
"""

from pathlib import Path

from pipeline.workflows.docs_tables import write_tables

if __name__ == "__main__":
    changed = write_tables(Path(__file__).resolve().parent.parent)
    print("docs tables: " + (", ".join(changed) + " updated" if changed else "up to date"))
