"""``roma-train bench``: quality benchmarks (their commands live in this subpackage)."""

import typer

bench_app = typer.Typer(
    help="Benchmarks that train and evaluate router patches and print a table.",
    no_args_is_help=True,
)
