"""Echelon's tools: the `echelon` command (demo, contest, wan-check, export, audit, replay), the
local launcher, the delaying TCP proxy, the corpus fetcher and the pool benchmark. They drive
the library (`echelon`) and the services (`services`); neither imports them."""
