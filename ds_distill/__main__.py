"""`python -m ds_distill ...` is the `ds-distill` command."""

from ds_distill.cli import main

main()
