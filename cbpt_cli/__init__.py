"""The top layer: the `cbpt-guard` command line, its progress display, and the pipelines that
join purification, export and the guard (purify into one folder, the demo)."""
