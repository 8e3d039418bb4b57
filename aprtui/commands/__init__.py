"""One module per subcommand. Each defines `HELP` (one line), `DESCRIPTION`, `EPILOG` (optional),
`add_arguments(parser)` and `run(args) -> int`. Modules import nothing heavy at top level, so
`apr-tui --help` stays fast; they raise `engine.errors.AprTuiError` for bad input and cli.py
turns it into one red line and exit code 2."""
