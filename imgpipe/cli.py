"""The `imgpipe` command (placeholder, filled below)."""
import typer

app = typer.Typer()
