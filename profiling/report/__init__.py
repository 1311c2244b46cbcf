"""`iecl report`: everything this project measures on a GPU machine, in one
command, within a time budget, written as one folder (report.md, a JSON per
measurement, charts, the machine's record) and optionally one archive.

- `plan`: the parts, their order, their sizes (full or dry run) and how the
  budget is shared among them;
- `parts`: what each part measures (each runs in a child process of its own);
- `runner`: the parent: runs the parts under their deadlines, records what
  each did, writes the report and the archive;
- `document`: report.md and the charts, from the parts' JSON.
"""
