from aprtui.cli import entry

raise SystemExit(entry())
