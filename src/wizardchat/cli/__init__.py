"""The command line: the typer app, its options, the error boundary and the wiring."""
